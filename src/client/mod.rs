//! `pigeon chat`: a terminal client on the Pigeon JSON protocol. Type `bob: hello` to
//! send, `/send bob ./clip.mp4` to send a file; incoming messages (offline catch-up
//! first) are printed and acknowledged, incoming files saved to the download directory.
//! With a password (`--password` or `PIGEON_PASSWORD`) it logs in with a `login` frame.
//!
//! Standard input is read on a thread of its own, so nothing typed waits on the network
//! and the network never waits on the keyboard. When the server goes away the client
//! reconnects with back-off (0.5 s doubling to 10 s, with jitter), keeps what is typed
//! meanwhile, and sends every unanswered message again with its first id (the server
//! drops the repeat). When the session cannot go on (replaced by another login, refused
//! credentials, the account gone) it says why at once and exits non-zero. Everything
//! from the network is printed through [`term::visible`].

mod term;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use term::visible;
use term::{Style, Term};

/// First reconnect delay; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After Ctrl-D, how long the client waits for its last messages to be answered.
const QUIT_WAIT: Duration = Duration::from_secs(5);
/// A send refused with `rate_limited` is tried again after this long.
const RATE_RETRY: Duration = Duration::from_secs(1);
/// Incoming seqs remembered to drop a message delivered twice around a reconnect.
const SEEN_SEQS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The session ended in a way the client cannot repair (the message says why).
    #[error("{0}")]
    Ended(String),
    #[error("terminal: {0}")]
    Io(#[from] std::io::Error),
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Sink = SplitSink<Ws, Message>;

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

/// Parses a typed line `bob: hello` into (recipient, text).
pub fn parse_line(line: &str) -> Option<(&str, &str)> {
    let (to, text) = line.split_once(':')?;
    let to = to.trim();
    (!to.is_empty()).then_some((to, text.strip_prefix(' ').unwrap_or(text)))
}

/// The name a received file is saved under: the sender's base name only, without
/// control characters, path separators or a leading dot, at most 128 bytes; or
/// `blob-<stream>` when nothing usable is left.
pub fn safe_name(name: &str, stream: u64) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut out = String::new();
    for c in base.chars() {
        let c = if c.is_control() || visible(&c.to_string()) != c.to_string() {
            '_'
        } else {
            c
        };
        if out.len() + c.len_utf8() > 128 {
            break;
        }
        out.push(c);
    }
    let out = out.trim_start_matches('.').trim().to_string();
    if out.is_empty() {
        format!("blob-{stream}")
    } else {
        out
    }
}

/// Where a received file is saved: [`safe_name`] in `dir`, made unique.
pub fn save_path(dir: &Path, name: &str, stream: u64) -> PathBuf {
    let base = safe_name(name, stream);
    let mut path = dir.join(&base);
    let mut n = 1;
    while path.symlink_metadata().is_ok() {
        path = dir.join(format!("{n}-{base}"));
        n += 1;
    }
    path
}

/// Creates the file a download goes to, never following or overwriting anything that
/// appeared there meanwhile.
async fn create_download(
    dir: &Path,
    name: &str,
    stream: u64,
) -> std::io::Result<(PathBuf, tokio::fs::File)> {
    for _ in 0..100 {
        let path = save_path(dir, name, stream);
        match tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
        {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free file name"))
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

/// Something typed that the server has not answered yet.
struct Pending {
    id: String,
    to: String,
    what: Outgoing,
    /// Refused with `rate_limited`: send again at this time.
    retry_at: Option<Instant>,
}

enum Outgoing {
    Text(String),
    File {
        path: PathBuf,
        name: String,
        size: u64,
        sha256: String,
    },
}

impl Pending {
    fn frame(&self) -> String {
        match &self.what {
            Outgoing::Text(body) => {
                json!({"type":"send","id":self.id,"to":self.to,"body":body}).to_string()
            }
            Outgoing::File {
                name, size, sha256, ..
            } => json!({"type":"blob","id":self.id,"to":self.to,"name":name,
                    "mime":"application/octet-stream","size":size,"sha256":sha256})
            .to_string(),
        }
    }

    fn describe(&self) -> String {
        match &self.what {
            Outgoing::Text(body) => format!("you → {}: {}", visible(&self.to), visible(body)),
            Outgoing::File { name, size, .. } => format!(
                "you → {}: file {} ({size} bytes)",
                visible(&self.to),
                visible(name)
            ),
        }
    }
}

/// How one connection ended.
enum End {
    /// Ctrl-D and everything answered (or the wait ran out).
    Quit,
    /// The server went away: reconnect.
    Lost(String),
    /// The session cannot go on: exit non-zero with this line.
    Fatal(String),
}

/// The client across reconnects.
struct Chat {
    url: String,
    user: String,
    password: Option<String>,
    download_dir: PathBuf,
    term: Term,
    input: mpsc::UnboundedReceiver<String>,
    input_closed: bool,
    quit_by: Option<Instant>,
    next_id: u64,
    id_prefix: i64,
    /// Typed and not yet answered, in the order typed.
    pending: Vec<Pending>,
    /// Files arriving, by stream.
    downloads: HashMap<u64, (PathBuf, tokio::fs::File)>,
    seen: BTreeSet<u64>,
    logged_in_before: bool,
    /// The current connection got its `welcome` (then the back-off starts over).
    welcomed: bool,
}

/// Reads standard input on a thread of its own; the channel closes at end of input.
fn spawn_stdin_reader() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("pigeon-stdin".into())
        .spawn(move || {
            use std::io::BufRead;
            let mut stdin = std::io::stdin().lock();
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match stdin.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        let line = line.trim_end_matches(['\n', '\r']).to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    if spawned.is_err() {
        // No thread, no input: the receiver reports end of input at once.
    }
    rx
}

/// `d` give or take a quarter, so many clients do not come back in step.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d.mul_f64(0.75 + f64::from(nanos % 1000) / 2000.0)
}

/// A connection failure in words a user can act on.
fn connect_reason(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused (is the server running?)".into()
        }
        E::Http(resp) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| visible(&String::from_utf8_lossy(b)))
                .unwrap_or_default();
            format!("the server answered HTTP {} {body}", resp.status())
        }
        other => visible(&other.to_string()),
    }
}

impl Chat {
    fn info(&mut self, line: &str) {
        self.term.line(Style::Info, line);
    }

    fn problem(&mut self, line: &str) {
        self.term.line(Style::Problem, line);
    }

    fn quit_wanted(&self) -> bool {
        self.input_closed && self.pending.is_empty()
    }

    /// Completes when the Ctrl-D grace period is over.
    fn until_quit(&self) -> impl std::future::Future<Output = ()> {
        let at = self.quit_by;
        async move {
            match at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        }
    }

    /// A typed line: queued as a pending send; its index when there is one.
    async fn typed(&mut self, line: Option<String>) -> Option<usize> {
        let Some(line) = line else {
            self.input_closed = true;
            self.quit_by = Some(Instant::now() + QUIT_WAIT);
            return None;
        };
        self.next_id += 1;
        let id = format!("{}-{}", self.id_prefix, self.next_id);
        if let Some((to, path)) = parse_send_file(&line) {
            return match file_sha256(Path::new(path)).await {
                Ok((size, sha256)) => {
                    let name = Path::new(path)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    self.pending.push(Pending {
                        id: format!("{id}-f"),
                        to: to.to_string(),
                        what: Outgoing::File {
                            path: PathBuf::from(path),
                            name,
                            size,
                            sha256,
                        },
                        retry_at: None,
                    });
                    Some(self.pending.len() - 1)
                }
                Err(e) => {
                    self.problem(&format!("! cannot read {}: {e}", visible(path)));
                    None
                }
            };
        }
        match parse_line(&line) {
            Some((to, text)) => {
                self.pending.push(Pending {
                    id,
                    to: to.to_string(),
                    what: Outgoing::Text(text.to_string()),
                    retry_at: None,
                });
                Some(self.pending.len() - 1)
            }
            None if line.trim().is_empty() => None,
            None => {
                self.problem("! type `name: message`, or `/send name ./file`");
                None
            }
        }
    }

    /// Runs until the user quits or the session cannot go on.
    async fn run(&mut self) -> Result<(), ClientError> {
        self.info("* type `name: message` to send, `/send name ./file` for a file, Ctrl-D to quit");
        let mut backoff = FIRST_BACKOFF;
        let mut connected_once = false;
        loop {
            let attempt =
                tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(&self.url))
                    .await;
            let end = match attempt {
                Ok(Ok((ws, _))) => {
                    connected_once = true;
                    let end = self.connection(ws).await;
                    if self.welcomed {
                        backoff = FIRST_BACKOFF;
                    }
                    end
                }
                Ok(Err(e)) => End::Lost(connect_reason(&e)),
                Err(_) => End::Lost("no answer".into()),
            };
            match end {
                End::Quit => return self.finish(),
                End::Fatal(why) => return Err(ClientError::Ended(why)),
                End::Lost(why) if !connected_once => {
                    return Err(ClientError::Connect {
                        url: visible(&self.url),
                        reason: why,
                    })
                }
                End::Lost(why) => {
                    let wait = jitter(backoff);
                    let queued = self.pending.len();
                    let queued = if queued > 0 {
                        format!("; {queued} unsent, kept")
                    } else {
                        String::new()
                    };
                    self.problem(&format!(
                        "! disconnected: {why}; reconnecting in {:.1} s{queued}",
                        wait.as_secs_f64()
                    ));
                    if let Some(End::Quit) = self.offline(wait).await {
                        return self.finish();
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// At the end: non-zero when typed messages never reached the server.
    fn finish(&mut self) -> Result<(), ClientError> {
        match self.pending.len() {
            0 => Ok(()),
            n => Err(ClientError::Ended(format!(
                "{n} message(s) typed were not confirmed by the server"
            ))),
        }
    }

    /// Waits `wait` between connections, keeping what is typed.
    async fn offline(&mut self, wait: Duration) -> Option<End> {
        let until = Instant::now() + wait;
        loop {
            if self.quit_wanted() {
                return Some(End::Quit);
            }
            let until_quit = self.until_quit();
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return None,
                _ = until_quit => return Some(End::Quit),
                line = self.input.recv(), if !self.input_closed => {
                    if self.typed(line).await.is_some() {
                        self.info("* not connected: kept, it goes out after the reconnect");
                    }
                }
            }
        }
    }

    /// One connection, from login to its end.
    async fn connection(&mut self, ws: Ws) -> End {
        self.welcomed = false;
        let (mut sink, mut stream) = ws.split();
        let lost = |e: tokio_tungstenite::tungstenite::Error| End::Lost(visible(&e.to_string()));
        if let Some(password) = &self.password {
            let login = json!({"type":"login","user":self.user,"password":password});
            if let Err(e) = sink.send(Message::text(login.to_string())).await {
                return lost(e);
            }
        }
        // Everything unanswered goes again, with its first id: the server drops repeats.
        for p in &mut self.pending {
            p.retry_at = None;
            if let Err(e) = sink.send(Message::text(p.frame())).await {
                return lost(e);
            }
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            if self.quit_wanted() {
                let _ = sink.close().await;
                return End::Quit;
            }
            let until_quit = self.until_quit();
            tokio::select! {
                _ = until_quit => {
                    let _ = sink.close().await;
                    return End::Quit;
                }
                line = self.input.recv(), if !self.input_closed => {
                    if let Some(i) = self.typed(line).await {
                        if let Err(e) = sink.send(Message::text(self.pending[i].frame())).await {
                            return lost(e);
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    for p in &mut self.pending {
                        if p.retry_at.is_some_and(|t| t <= now) {
                            p.retry_at = None;
                            if let Err(e) = sink.send(Message::text(p.frame())).await {
                                return lost(e);
                            }
                        }
                    }
                }
                frame = stream.next() => {
                    let end = match frame {
                        None => Some(End::Lost("the server closed the connection".into())),
                        Some(Err(e)) => Some(lost(e)),
                        Some(Ok(Message::Text(t))) => self.on_text(t.as_str(), &mut sink).await,
                        Some(Ok(Message::Binary(b))) => self.on_chunk(&b).await,
                        Some(Ok(Message::Close(c))) => Some(self.on_close(c.map(|c| (c.code, c.reason.to_string())))),
                        Some(Ok(_)) => None,
                    };
                    if let Some(end) = end {
                        drop(stream);
                        return end;
                    }
                }
            }
        }
    }

    /// A close frame without an earlier error or kick that said more.
    fn on_close(&self, close: Option<(CloseCode, String)>) -> End {
        let Some((code, reason)) = close else {
            return End::Lost("the server closed the connection".into());
        };
        let reason = visible(&reason);
        match u16::from(code) {
            4000 => End::Fatal(self.replaced()),
            4001 => End::Fatal(format!("{} is not a valid user name", visible(&self.user))),
            4003 => End::Fatal(self.auth_problem(&reason, "", None)),
            4009 => End::Fatal(self.takeover_loop()),
            1001 => End::Lost("the server is restarting or shutting down".into()),
            c @ 4000..=4999 if c != 4008 && c != 4010 && c != 4002 => End::Fatal(format!(
                "the server ended the session: {reason} (close code {c})"
            )),
            c => End::Lost(format!("the server closed the connection ({c} {reason})")),
        }
    }

    fn replaced(&self) -> String {
        format!(
            "{} logged in somewhere else, which ended this session",
            visible(&self.user)
        )
    }

    fn takeover_loop(&self) -> String {
        format!(
            "{} keeps logging in from another place; stop the other client and try again",
            visible(&self.user)
        )
    }

    /// A refused login in words, by error code.
    fn auth_problem(&self, code: &str, message: &str, try_again_in: Option<u64>) -> String {
        let user = visible(&self.user);
        match code {
            "auth_required" => "this server needs a password: --password or PIGEON_PASSWORD".into(),
            "bad_credentials" if self.password.is_some() => {
                format!("wrong password for {user} (or no such user)")
            }
            "too_many_attempts" => format!(
                "too many failed logins for {user}: try again in {} s",
                try_again_in.unwrap_or(60)
            ),
            "token_expired" => "the session expired: start the client again".into(),
            "" => "the server refused the login".into(),
            _ => format!("login refused: {}", visible(message)),
        }
    }

    /// One JSON frame from the server; `Some` when the connection is over.
    async fn on_text(&mut self, text: &str, sink: &mut Sink) -> Option<End> {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return None;
        };
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let offline = if v.get("offline") == Some(&Value::Bool(true)) {
            "[offline] "
        } else {
            ""
        };
        let stream = v.get("stream").and_then(Value::as_u64).unwrap_or(0);
        let seq = v.get("seq").and_then(Value::as_u64);
        match s("type").as_str() {
            "welcome" => {
                let first = !self.logged_in_before;
                self.logged_in_before = true;
                self.welcomed = true;
                let pending = v.get("pending").and_then(Value::as_u64).unwrap_or(0);
                let line = if first {
                    format!("* logged in as {} ({pending} waiting)", visible(&s("user")))
                } else {
                    format!("* reconnected ({pending} waiting)")
                };
                self.info(&line);
            }
            "synced" => self.info("* up to date"),
            "msg" => {
                let fresh = seq.is_none_or(|q| self.seen.insert(q));
                if fresh {
                    let body = match v.get("body") {
                        Some(Value::String(t)) => t.clone(),
                        Some(other) => other.to_string(),
                        None => String::new(),
                    };
                    let line = format!("{offline}{}: {}", visible(&s("from")), visible(&body));
                    self.term.line(Style::Incoming, &line);
                }
                while self.seen.len() > SEEN_SEQS {
                    self.seen.pop_first();
                }
                if let Some(q) = seq {
                    let ack = json!({"type":"ack","upto":q}).to_string();
                    if let Err(e) = sink.send(Message::text(ack)).await {
                        return Some(End::Lost(visible(&e.to_string())));
                    }
                }
            }
            "sent" => {
                let id = s("id");
                if let Some(i) = self.pending.iter().position(|p| p.id == id) {
                    let p = self.pending.remove(i);
                    let line = format!("{}  [{}]", p.describe(), visible(&s("status")));
                    self.term.line(Style::Outgoing, &line);
                }
            }
            "error" => {
                let code = s("code");
                let message = s("message");
                let id = v.get("id").and_then(Value::as_str).map(str::to_string);
                match id.and_then(|id| self.pending.iter().position(|p| p.id == id)) {
                    Some(i) if code == "rate_limited" => {
                        self.pending[i].retry_at = Some(Instant::now() + RATE_RETRY);
                    }
                    Some(i) => {
                        let p = self.pending.remove(i);
                        let line = format!(
                            "! not sent: {}: {} ({})",
                            p.describe(),
                            visible(&message),
                            visible(&code)
                        );
                        self.problem(&line);
                    }
                    None => match code.as_str() {
                        "auth_required" | "bad_credentials" | "too_many_attempts"
                        | "token_expired" => {
                            let wait = v.get("try_again_in").and_then(Value::as_u64);
                            return Some(End::Fatal(self.auth_problem(&code, &message, wait)));
                        }
                        "invalid_user" => {
                            return Some(End::Fatal(format!(
                                "{} is not a valid user name: {}",
                                visible(&self.user),
                                visible(&message)
                            )))
                        }
                        "takeover_loop" => return Some(End::Fatal(self.takeover_loop())),
                        _ => {
                            let line = format!("! {} ({})", visible(&message), visible(&code));
                            self.problem(&line);
                        }
                    },
                }
            }
            "kicked" => {
                return Some(End::Fatal(match s("reason").as_str() {
                    "session_replaced" => self.replaced(),
                    _ => format!("the server ended this session: {}", visible(&s("message"))),
                }));
            }
            "blob_accepted" => return self.upload(&s("id"), stream, sink).await,
            "blob_start" => {
                let name = s("name");
                let size = v.get("size").and_then(Value::as_u64).unwrap_or(0);
                let line = format!(
                    "{offline}{} is sending {} ({size} bytes)",
                    visible(&s("from")),
                    visible(&name)
                );
                self.term.line(Style::Incoming, &line);
                match create_download(&self.download_dir, &name, stream).await {
                    Ok(d) => {
                        self.downloads.insert(stream, d);
                    }
                    Err(e) => self.problem(&format!(
                        "! cannot save it in {}: {e}",
                        visible(&self.download_dir.display().to_string())
                    )),
                }
            }
            "blob_end" => {
                let mut saved = false;
                if let Some((path, mut f)) = self.downloads.remove(&stream) {
                    match f.flush().await {
                        Ok(()) => {
                            saved = true;
                            let line = format!("* saved {}", visible(&path.display().to_string()));
                            self.info(&line);
                        }
                        Err(e) => self.problem(&format!("! saving failed: {e}")),
                    }
                }
                if let Some(q) = seq.filter(|_| saved) {
                    let ack = json!({"type":"ack","upto":q}).to_string();
                    if let Err(e) = sink.send(Message::text(ack)).await {
                        return Some(End::Lost(visible(&e.to_string())));
                    }
                }
            }
            "blob_abort" => {
                if let Some((path, f)) = self.downloads.remove(&stream) {
                    drop(f);
                    let _ = tokio::fs::remove_file(&path).await;
                }
                self.problem(&format!("! transfer stopped: {}", visible(&s("reason"))));
            }
            _ => {}
        }
        None
    }

    /// A binary chunk of an incoming file.
    async fn on_chunk(&mut self, b: &[u8]) -> Option<End> {
        if b.len() <= 4 {
            return None;
        }
        let stream = u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if let Some((path, f)) = self.downloads.get_mut(&stream) {
            if let Err(e) = f.write_all(&b[4..]).await {
                let line = format!(
                    "! writing {} failed: {e}",
                    visible(&path.display().to_string())
                );
                if let Some((path, _)) = self.downloads.remove(&stream) {
                    let _ = tokio::fs::remove_file(&path).await;
                }
                self.problem(&line);
            }
        }
        None
    }

    /// Streams a file the server accepted, showing progress.
    async fn upload(&mut self, id: &str, stream: u64, sink: &mut Sink) -> Option<End> {
        let (path, name, size) = self
            .pending
            .iter()
            .find(|p| p.id == id)
            .and_then(|p| match &p.what {
                Outgoing::File {
                    path, name, size, ..
                } => Some((path.clone(), visible(name), *size)),
                Outgoing::Text(_) => None,
            })?;
        let Ok(stream) = u32::try_from(stream) else {
            return None;
        };
        let abort = |why: String| {
            let frame = json!({"type":"blob_abort","stream":stream}).to_string();
            (frame, why)
        };
        let failed = match tokio::fs::File::open(&path).await {
            Err(e) => Some(abort(format!("cannot read {name}: {e}"))),
            Ok(mut f) => {
                let mut buf = vec![0u8; 4 + 256 * 1024];
                buf[..4].copy_from_slice(&stream.to_be_bytes());
                let mut done = 0u64;
                self.term.progress(&name, 0, size);
                loop {
                    let n = match f.read(&mut buf[4..]).await {
                        Ok(n) => n,
                        Err(e) => break Some(abort(format!("cannot read {name}: {e}"))),
                    };
                    if n == 0 {
                        break None;
                    }
                    if let Err(e) = sink.send(Message::binary(buf[..4 + n].to_vec())).await {
                        return Some(End::Lost(visible(&e.to_string())));
                    }
                    done += n as u64;
                    self.term.progress(&name, done.min(size), size);
                }
            }
        };
        if let Some((frame, why)) = failed {
            self.pending.retain(|p| p.id != id);
            self.problem(&format!("! {why}"));
            if let Err(e) = sink.send(Message::text(frame)).await {
                return Some(End::Lost(visible(&e.to_string())));
            }
        }
        None
    }
}

/// Chats as `user`; with a `password` it logs in with a `login` frame (password mode;
/// an open server accepts it too), without one it names itself in the URL (open mode).
/// Received files go to `download_dir`.
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
    let mut chat = Chat {
        url,
        user: user.to_string(),
        password: password.map(str::to_string),
        download_dir: download_dir.to_path_buf(),
        term: Term::new(),
        input: spawn_stdin_reader(),
        input_closed: false,
        quit_by: None,
        next_id: 0,
        id_prefix: crate::now_ms(),
        pending: Vec::new(),
        downloads: HashMap::new(),
        seen: BTreeSet::new(),
        logged_in_before: false,
        welcomed: false,
    };
    chat.run().await
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
        assert_eq!(safe_name("..\\..\\win.ini", 1), "win.ini");
        assert_eq!(safe_name(".bashrc", 1), "bashrc");
        assert_eq!(safe_name("a\x1b]0;x\x07.txt", 1), "a_]0;x_.txt");
        assert_eq!(safe_name("a\nb\u{202e}gpj.exe", 1), "a_b_gpj.exe");
        assert!(safe_name(&"x".repeat(1000), 1).len() <= 128);
    }
}
