//! Benchmark peer: a bare tokio-tungstenite relay, the floor Pigeon is measured against.
//! A name → sender map, no storage, no acks; the hash dialect (`from#body#to`, the first
//! frame names the sender); the sender is answered like Pigeon answers it (`send success`,
//! preceded by `Out Line` when the recipient is offline, whose message is then dropped);
//! binary frames go to the recipient of the last text frame.
//! Same WebSocket settings as Pigeon's defaults (4 KiB read and write buffers) and the
//! same writer shape (a task per connection that batches queued frames, then flushes).
//! Built into the `load` bench binary and started by it as `load bare-relay --bind ADDR`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

type Users = Arc<Mutex<HashMap<String, (u64, mpsc::UnboundedSender<Message>)>>>;

/// Frames the writer feeds before it flushes, like Pigeon's writer.
const WRITE_BATCH: usize = 256;

/// Pigeon's defaults from `config.toml` (`[websocket]`, `[limits]`).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(Some(1024 * 1024))
        .max_frame_size(Some(1024 * 1024))
}

/// Serves until the process is killed.
pub fn main(bind: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(bind).await?;
        let users: Users = Arc::default();
        let mut next_id = 0u64;
        loop {
            let (socket, _) = match listener.accept().await {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            next_id += 1;
            tokio::spawn(connection(socket, next_id, users.clone()));
        }
    })
}

async fn connection(socket: TcpStream, id: u64, users: Users) {
    let _ = socket.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(socket, Some(ws_config())).await
    else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            if sink.feed(first).await.is_err() {
                return;
            }
            for _ in 1..WRITE_BATCH {
                match rx.try_recv() {
                    Ok(m) => {
                        if sink.feed(m).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let mut me: Option<String> = None;
    // Binary frames go, as they are, to the recipient of the last text frame (the blob
    // scenario's ceiling); no flow control, like the text path.
    let mut last_to: Option<mpsc::UnboundedSender<Message>> = None;
    while let Some(Ok(frame)) = stream.next().await {
        let text = match frame {
            Message::Text(text) => text,
            Message::Binary(data) => {
                if let Some(peer) = &last_to {
                    let _ = peer.send(Message::Binary(data));
                }
                continue;
            }
            _ => continue,
        };
        let s = text.as_str();
        let (Some(first), Some(last)) = (s.find('#'), s.rfind('#')) else {
            let _ = tx.send(Message::text("!error#bad_frame#expected from#msg#to"));
            continue;
        };
        if first == last {
            let _ = tx.send(Message::text("!error#bad_frame#expected from#msg#to"));
            continue;
        }
        let (from, to) = (&s[..first], &s[last + 1..]);
        if me.is_none() {
            me = Some(from.to_string());
            if let Ok(mut map) = users.lock() {
                map.insert(from.to_string(), (id, tx.clone()));
            }
        }
        let peer = users
            .lock()
            .ok()
            .and_then(|map| map.get(to).map(|(_, t)| t.clone()));
        last_to.clone_from(&peer);
        match peer {
            Some(peer) => {
                let _ = peer.send(Message::Text(text));
            }
            None => {
                let _ = tx.send(Message::text("Out Line"));
            }
        }
        let _ = tx.send(Message::text("send success"));
    }
    if let Some(me) = me {
        if let Ok(mut map) = users.lock() {
            if map.get(&me).is_some_and(|(i, _)| *i == id) {
                map.remove(&me);
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
