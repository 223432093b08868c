//! Configuration: the `config.toml` schema with its defaults, `PIGEON_<SECTION>_<KEY>`
//! environment overrides. A key Pigeon does not know (a typo in the file or in a
//! variable's name) stops start-up with a did-you-mean suggestion rather than being
//! ignored while its default applies.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A key no section has; `hint` is a did-you-mean (or empty).
    #[error("unknown key {key} in {source_name}{hint}")]
    UnknownKey {
        key: String,
        source_name: String,
        hint: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub limits: LimitsConfig,
    pub websocket: WebSocketConfig,
    pub log: LogConfig,
    pub cluster: ClusterConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerConfig {
    /// Address to listen on: `host:port` (`127.0.0.1:8080`, `localhost:8080`,
    /// `[::1]:8080`), or `:port` for every interface (`0.0.0.0`).
    #[serde(deserialize_with = "deserialize_bind")]
    pub bind: SocketAddr,
    /// Directory served at `/` instead of the web client compiled into the binary (for
    /// working on the client). Empty (the default): the built-in copy.
    pub static_dir: PathBuf,
    /// The URL(s) people open the web client at, e.g. `https://chat.example.com`: pages
    /// from these origins may open WebSockets and the page's Content-Security-Policy lets
    /// it connect there. Empty: the listening address, `localhost` and `127.0.0.1` at the
    /// listening port (`https` with TLS). A list, or a comma-separated string.
    #[serde(deserialize_with = "string_or_list")]
    pub public_url: Vec<String>,
    /// Most connections (HTTP and WebSocket) open at once; further ones wait in the
    /// kernel's backlog.
    pub max_connections: usize,
    /// On shutdown, how long sessions get to say goodbye before the process exits.
    pub shutdown_grace_secs: u64,
    /// How long a new login waits for the session it replaces to finish.
    pub takeover_wait_ms: u64,
    /// Slowloris guard: how long a client may take to send its HTTP request headers (and
    /// the TLS handshake) before the connection is closed.
    pub header_timeout_secs: u64,
    /// Test-only: serve `GET /echo`, a WebSocket that echoes every text and binary
    /// message, for WebSocket conformance tests (Autobahn). Needs a build with the cargo
    /// feature `echo` (the tests' build; refused otherwise). Never enable in production.
    pub echo_route: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            static_dir: PathBuf::new(),
            public_url: Vec::new(),
            max_connections: 10_000,
            shutdown_grace_secs: 5,
            takeover_wait_ms: 2_000,
            header_timeout_secs: 10,
            echo_route: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct StorageConfig {
    /// "sqlite" (embedded, default) or "mongodb".
    pub backend: String,
    /// Where the embedded store keeps its files.
    pub data_dir: PathBuf,
    /// SQLite `synchronous` pragma: "normal" survives a process crash (kill -9),
    /// "full" also survives power loss at some cost in throughput.
    pub sqlite_synchronous: String,
    /// How long a (sender, client id) pair is remembered to drop retried sends.
    pub dedupe_window_secs: u64,
    /// SQLite: how long a write waits for a lock held by another connection on the same
    /// file before the write fails (the sender gets `store_unavailable`).
    pub sqlite_busy_timeout_ms: u64,
    /// MongoDB connection string (backend "mongodb").
    pub mongodb_uri: String,
    /// MongoDB database Pigeon keeps its collections in.
    pub mongodb_database: String,
    /// Write concern for every MongoDB write, always journaled: "majority" or a number
    /// of nodes such as "1". A sender hears "stored" only once it is satisfied.
    #[serde(deserialize_with = "string_or_integer")]
    pub mongodb_write_concern: String,
    /// Stored messages (and their blobs) expire this many seconds after acceptance; 0
    /// keeps them until acknowledged. MongoDB: a TTL index; SQLite: a background sweep.
    pub offline_ttl_secs: u64,
    /// The write-behind fast path (SQLite, not in cluster mode): a
    /// message to a user online on this server goes to their session at once and is
    /// written only if still unacknowledged this many milliseconds later; the sender's
    /// answer waits for the acknowledgement or that write. 0 writes every message first.
    pub write_behind_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: "sqlite".into(),
            data_dir: PathBuf::from("data"),
            sqlite_synchronous: "normal".into(),
            dedupe_window_secs: 86_400,
            sqlite_busy_timeout_ms: 5_000,
            mongodb_uri: "mongodb://127.0.0.1:27017".into(),
            mongodb_database: "pigeon".into(),
            mongodb_write_concern: "majority".into(),
            offline_ttl_secs: 0,
            write_behind_ms: 2,
        }
    }
}

/// The forms `--bind` and `[server] bind` accept, for error messages.
pub const BIND_FORMS: &str =
    "host:port such as 127.0.0.1:8080, localhost:8080 or [::1]:8080, or :8080 for every interface";

/// Parses a listen address: `ip:port`, `[ipv6]:port`, `name:port` (resolved, first
/// address; `localhost` is 127.0.0.1), or `:port` for every IPv4 interface.
pub fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let bad = || format!("invalid listen address {s:?}: use {BIND_FORMS}");
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    match host {
        "" | "*" => Ok(SocketAddr::from(([0, 0, 0, 0], port))),
        h if h.eq_ignore_ascii_case("localhost") => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
        h if !h.is_empty() && !h.contains(['[', ']', ':', '/', ' ']) => {
            use std::net::ToSocketAddrs;
            (h, port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| {
                    format!("cannot resolve {h:?} in listen address {s:?}: use {BIND_FORMS}")
                })
        }
        _ => Err(bad()),
    }
}

fn deserialize_bind<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    parse_bind(&s).map_err(serde::de::Error::custom)
}

/// Accepts `"1"` as well as `1`: `PIGEON_STORAGE_MONGODB_WRITE_CONCERN=1` arrives as a
/// TOML integer.
fn string_or_integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StringOrInt {
        S(String),
        I(i64),
    }
    Ok(match StringOrInt::deserialize(d)? {
        StringOrInt::S(s) => s,
        StringOrInt::I(i) => i.to_string(),
    })
}

/// Accepts a list of strings, or one string holding a comma-separated list (the form an
/// environment variable gives: `PIGEON_AUTH_ALLOWED_ORIGINS=https://a.example,https://b.example`).
fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StringOrList {
        S(String),
        L(Vec<String>),
    }
    let items = match StringOrList::deserialize(d)? {
        StringOrList::S(s) => s.split(',').map(String::from).collect(),
        StringOrList::L(l) => l,
    };
    Ok(items
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitsConfig {
    /// Largest text frame accepted as a message; larger ones get a `too_large` error.
    pub max_text_bytes: usize,
    /// Largest WebSocket message or frame at all; larger ones close the socket with 1009.
    pub max_message_bytes: usize,
    /// Frames queued to one session's writer before live traffic is diverted to its
    /// mailbox (it then catches up from the store).
    pub session_queue: usize,
    /// Unacknowledged messages one user's mailbox may hold.
    pub mailbox_max: u64,
    /// Bad frames in a row before the session is closed with 4002.
    pub max_consecutive_errors: u32,
    /// Messages read from the store per batch when flushing a mailbox.
    pub flush_batch: usize,
    /// Largest blob (file, video) one transfer may announce.
    pub max_blob_bytes: u64,
    /// Blob transfers one session may have in flight at once.
    pub max_transfers: usize,
    /// Blob bytes queued to one recipient's socket before the sender waits (backpressure).
    pub blob_relay_bytes: usize,
    /// Blob bytes one session has received and not yet written to blob storage (and
    /// hashed): beyond it the sender waits (a disk slower than the socket).
    pub blob_spool_bytes: usize,
    /// Payload bytes per binary frame when the server streams a stored blob.
    pub blob_chunk_bytes: usize,
    /// A socket that accepts no bytes for this long is dropped (a client that never reads).
    pub write_timeout_secs: u64,
    /// Frames per second one connection may send on average (token bucket refill rate).
    /// 0 turns rate limiting off, which is the built-in default; the shipped `config.toml`
    /// turns it on.
    pub rate_per_sec: u32,
    /// Frames one connection may send in a burst (token bucket size).
    pub rate_burst: u32,
    /// Frames refused with `rate_limited` before the bucket refilled that close the
    /// session with 4008.
    pub rate_strikes: u32,
    /// WebSocket pings per second one connection may send on average, on top of the
    /// frame rate: each costs a pong, and a client needs about one every few seconds.
    /// Pings beyond it are strikes like frames beyond `rate_per_sec`. 0 turns it off.
    pub ping_per_sec: u32,
    /// Pings one connection may send in a burst above `ping_per_sec`.
    pub ping_burst: u32,
    /// Connections of one IP address closed for flooding (4008) within `flood_ban_secs`
    /// after which its new connections are dropped on accept, until the oldest of those
    /// closes is `flood_ban_secs` old. 0 turns the ban off (do that behind a reverse
    /// proxy, where every client has the proxy's address).
    pub flood_ban_after: u32,
    pub flood_ban_secs: u64,
    /// Self-registrations (`[auth] allow_register`) one IP address may make within
    /// `register_window_secs`; more get 429 `too_many_registrations` before any hashing.
    /// 0 turns the cap off (behind a reverse proxy every client has its address).
    pub register_per_ip: u32,
    pub register_window_secs: u64,
    /// Connections (HTTP and WebSocket) one IP address may hold open at once; more are
    /// answered with HTTP 429. 0 means no cap.
    pub max_connections_per_ip: usize,
    /// Seconds a WebSocket may stay open without identifying; then it is closed with 4010.
    pub login_timeout_secs: u64,
    /// Failed logins (password or token) for one user from one IP address before further
    /// attempts are refused with `too_many_attempts`; one IP address gets four times as
    /// many across all users. An attempt counts from the moment it is let through (before
    /// its password is hashed), so parallel attempts cannot exceed it.
    pub login_max_failures: u32,
    /// How long failed logins are remembered, and how long a throttled user/IP waits the
    /// first time. Each further lock-out of the same user and address doubles the wait,
    /// up to `login_backoff_max_secs`.
    pub login_backoff_secs: u64,
    pub login_backoff_max_secs: u64,
    /// Failed password logins for one user from all addresses together within
    /// `login_user_window_secs`; beyond it password logins for that user are refused
    /// from addresses that never logged in as them. Looser than the per-address limit and
    /// with a short window, so an attacker can lock the real user out only briefly.
    pub login_user_max_failures: u32,
    pub login_user_window_secs: u64,
    /// Entries the failed-login bookkeeping may hold (users, addresses and pairs); when
    /// full, logins with new keys are refused with `too_busy` instead of growing it.
    pub login_throttle_max_keys: usize,
    /// Password hashes (argon2, ~19 MiB each) computed at once; 0 = half the CPUs (at
    /// least one), so that a guessing flood leaves CPU to logged-in users.
    pub hash_workers: usize,
    /// Logins and registrations that may wait for a hashing slot; beyond that they are
    /// refused at once with `too_busy` (HTTP 503).
    pub hash_queue: usize,
    /// Largest request body `POST /api/login` and `/api/register` read (bytes).
    pub api_max_body_bytes: usize,
    /// Bytes a WebSocket may send in password mode before it has logged in (its login
    /// frames and pings; about one read buffer more may be read). Past it the socket is
    /// closed (1009), so a huge login frame costs the server this much, not the frame.
    pub prelogin_bytes: usize,
    /// Take-overs of one user allowed within `takeover_window_secs`; the login after
    /// that is refused with `takeover_loop` (two clients fighting over one account).
    pub takeover_max: u32,
    pub takeover_window_secs: u64,
    /// Messages one sender may have waiting in mailboxes (sent, not yet acknowledged by
    /// their recipients); beyond it sends are refused with `quota_exceeded`. 0: no cap.
    pub sender_quota_messages: u64,
    /// Bytes (text bodies plus blob sizes) one sender may have waiting in mailboxes;
    /// beyond it sends and blob announces are refused with `quota_exceeded`. 0: no cap.
    pub sender_quota_bytes: u64,
    /// Bytes (text bodies plus blob sizes) all mailboxes together may hold; beyond it
    /// every send is refused with `store_full`. 0: no cap.
    pub store_max_bytes: u64,
    /// A blob transfer that receives no chunk for this long is aborted with
    /// `blob_timeout` (its spool file deleted); the session stays open.
    pub blob_idle_secs: u64,
    /// Largest raw binary frame a hash or seed-JSON session may send (the tutorials send
    /// a file or video as one frame); it is spooled to blob storage like a blob. The
    /// WebSocket layer accepts frames up to the larger of this and `max_message_bytes`;
    /// every other kind of frame is checked against its own limit after that.
    pub legacy_binary_max_bytes: usize,
    /// How long a download link (`GET /api/blobs/{key}`) handed out with a file stays
    /// valid, and how long a blob stays stored after its message was acknowledged so
    /// that such a link keeps working. 0: no download links; a blob is deleted with its
    /// message's ack.
    pub blob_link_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_text_bytes: 64 * 1024,
            max_message_bytes: 1024 * 1024,
            session_queue: 256,
            mailbox_max: 10_000,
            max_consecutive_errors: 20,
            flush_batch: 512,
            max_blob_bytes: 256 * 1024 * 1024,
            max_transfers: 4,
            blob_relay_bytes: 4 * 1024 * 1024,
            blob_spool_bytes: 2 * 1024 * 1024,
            blob_chunk_bytes: 256 * 1024,
            write_timeout_secs: 30,
            rate_per_sec: 0,
            rate_burst: 100,
            rate_strikes: 10,
            ping_per_sec: 5,
            ping_burst: 20,
            flood_ban_after: 5,
            flood_ban_secs: 60,
            register_per_ip: 5,
            register_window_secs: 3600,
            max_connections_per_ip: 256,
            login_timeout_secs: 10,
            login_max_failures: 5,
            login_backoff_secs: 60,
            login_backoff_max_secs: 3600,
            login_user_max_failures: 20,
            login_user_window_secs: 30,
            login_throttle_max_keys: 100_000,
            hash_workers: 0,
            hash_queue: 64,
            api_max_body_bytes: 16 * 1024,
            prelogin_bytes: 16 * 1024,
            takeover_max: 20,
            takeover_window_secs: 60,
            sender_quota_messages: 50_000,
            sender_quota_bytes: 1024 * 1024 * 1024,
            store_max_bytes: 0,
            blob_idle_secs: 30,
            legacy_binary_max_bytes: 16 * 1024 * 1024,
            blob_link_secs: 3600,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WebSocketConfig {
    /// tokio-tungstenite read buffer per connection (held by every idle session too; a
    /// larger frame grows it as needed), and the most it reads per call.
    pub read_buffer_bytes: usize,
    /// The socket is read in pieces this large (then served to tungstenite
    /// `read_buffer_bytes` at a time); given back when drained (0: no read-ahead).
    pub read_ahead_bytes: usize,
    /// Bytes gathered before the writer writes to the socket (a flush always writes).
    pub write_buffer_bytes: usize,
    /// Most bytes buffered for writing before a write fails (slow reader).
    pub max_write_buffer_bytes: usize,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            read_buffer_bytes: 1024,
            read_ahead_bytes: 64 * 1024,
            write_buffer_bytes: 4096,
            max_write_buffer_bytes: 4 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// "pretty" or "json".
    pub format: String,
    /// A tracing filter, e.g. "info" or "pigeon=debug".
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "pretty".into(),
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ClusterConfig {
    /// `redis://host:port/` turns cluster mode on; empty (the default) is a single node.
    pub redis_url: String,
    /// This node's name in the cluster; empty picks a unique one at start-up.
    pub node_id: String,
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.redis_url.is_empty()
    }
}

/// Who may use which name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthConfig {
    /// "password": accounts with passwords and signed session tokens; "open": anyone may
    /// claim any name, as the seed tutorials did (logged as a warning at start-up).
    ///
    /// The built-in default (`Config::default()`, used when no config file is given and by
    /// the test harness) is "open" so the tutorials and existing tests work unchanged;
    /// the shipped `config.toml` sets "password", the setting for any real deployment.
    pub mode: String,
    /// Key that signs session tokens. Empty: a random key is generated once and kept in
    /// `<storage.data_dir>/auth_secret`, so tokens survive restarts.
    pub secret: String,
    /// How long a token from `POST /api/login` stays valid.
    pub token_ttl_secs: u64,
    /// Whether `POST /api/register` creates accounts (otherwise only `pigeon user add`).
    pub allow_register: bool,
    /// Shortest password `POST /api/register` accepts (`pigeon user add` only needs one
    /// character: the operator decides).
    pub min_password_chars: usize,
    /// Origins (e.g. "http://localhost:3000") whose browser pages may open WebSockets and
    /// use the account API, besides the server's own (`[server] public_url`). Compared
    /// exactly: scheme, host and port. "*": any. Requests without an `Origin` header
    /// (non-browser clients) are always allowed. A list, or a comma-separated string
    /// (`PIGEON_AUTH_ALLOWED_ORIGINS=http://a.example:3000,http://b.example`).
    #[serde(deserialize_with = "string_or_list")]
    pub allowed_origins: Vec<String>,
    /// How often (milliseconds) the server reads the store's account change feed to end
    /// the live sessions of users whose password was changed or who were deleted, also by
    /// `pigeon user` in another process or on another node (password mode only). Bounds
    /// how long such a session outlives the change.
    pub revoke_poll_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: "open".into(),
            secret: String::new(),
            token_ttl_secs: 86_400,
            allow_register: false,
            min_password_chars: 8,
            allowed_origins: Vec::new(),
            revoke_poll_ms: 1000,
        }
    }
}

impl AuthConfig {
    pub fn password_mode(&self) -> bool {
        self.mode == "password"
    }
}

/// TLS on the listening port (wss:// and https://). Both paths set: TLS only; both empty:
/// plain TCP.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert.is_empty() || !self.key.is_empty()
    }
}

const SECTIONS: [&str; 8] = [
    "server",
    "storage",
    "limits",
    "websocket",
    "log",
    "auth",
    "tls",
    "cluster",
];

impl Config {
    /// Reads `path` (if given and present) and applies `PIGEON_*` overrides from `env`.
    /// A key Pigeon does not know is an error naming where it came from and the key
    /// meant, if one is close. The list returned beside the config is always empty
    /// today (it is where accepted-but-deprecated keys would be reported).
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Invalid(format!("{}: {e}", p.display())))?
            }
            None => toml::Table::new(),
        };
        let file_name = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the configuration".into());
        let from_env = apply_env(&mut table, env)?;
        // Unknown keys first: a typo'd key is a better explanation than the type error
        // it may also cause.
        if let Some((section, key)) = unknown_keys(&table).into_iter().next() {
            return Err(unknown_key_error(
                &section,
                key.as_deref(),
                &from_env,
                &file_name,
            ));
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok((config, Vec::new()))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if l.max_text_bytes == 0 || l.max_text_bytes > l.max_message_bytes {
            return bad("limits.max_text_bytes must be between 1 and limits.max_message_bytes");
        }
        if l.session_queue == 0 || l.flush_batch == 0 || l.mailbox_max == 0 {
            return bad("limits.session_queue, flush_batch and mailbox_max must be positive");
        }
        if l.max_transfers == 0 || l.write_timeout_secs == 0 || l.blob_idle_secs == 0 {
            return bad(
                "limits.max_transfers, write_timeout_secs and blob_idle_secs must be positive",
            );
        }
        if l.blob_chunk_bytes == 0 || l.blob_chunk_bytes + 4 > l.max_message_bytes {
            return bad("limits.blob_chunk_bytes must be positive and fit (with its 4-byte header) in max_message_bytes");
        }
        if l.legacy_binary_max_bytes == 0 || l.legacy_binary_max_bytes as u64 > l.max_blob_bytes {
            return bad(
                "limits.legacy_binary_max_bytes must be between 1 and limits.max_blob_bytes",
            );
        }
        if l.blob_spool_bytes == 0 || l.blob_spool_bytes as u64 > u64::from(u32::MAX) {
            return bad("limits.blob_spool_bytes must be between 1 and 4294967295");
        }
        if l.blob_relay_bytes < l.max_message_bytes {
            return bad("limits.blob_relay_bytes must be at least limits.max_message_bytes");
        }
        // Tungstenite refuses to queue a frame larger than its write buffer limit, so a
        // message the server accepted could never be written back out (legacy blob relay,
        // the echo route): the writer would fail and the session die.
        if self.websocket.max_write_buffer_bytes <= l.max_message_bytes + 14 {
            return bad("websocket.max_write_buffer_bytes must be above limits.max_message_bytes (plus 14 bytes of frame header)");
        }
        if self.server.echo_route && !cfg!(feature = "echo") {
            return bad("server.echo_route needs a build with the test-only echo route (cargo build --features echo; cargo test turns it on)");
        }
        if self.server.header_timeout_secs == 0 {
            return bad("server.header_timeout_secs must be positive");
        }
        if self.server.max_connections == 0 {
            return bad("server.max_connections must be positive");
        }
        if !["normal", "full"].contains(&self.storage.sqlite_synchronous.as_str()) {
            return bad("storage.sqlite_synchronous must be \"normal\" or \"full\"");
        }
        if self.cluster.enabled() && self.storage.backend == "sqlite" {
            return bad("cluster mode needs a store every node shares: set [storage] backend = \"mongodb\" (the embedded SQLite store belongs to one node)");
        }
        if !["sqlite", "mongodb"].contains(&self.storage.backend.as_str()) {
            return bad("storage.backend must be \"sqlite\" or \"mongodb\"");
        }
        let wc = self.storage.mongodb_write_concern.as_str();
        if wc != "majority" && !wc.parse::<u32>().is_ok_and(|n| n >= 1) {
            return bad(
                "storage.mongodb_write_concern must be \"majority\" or a number of nodes >= 1",
            );
        }
        if !["pretty", "json"].contains(&self.log.format.as_str()) {
            return bad("log.format must be \"pretty\" or \"json\"");
        }
        if !["password", "open"].contains(&self.auth.mode.as_str()) {
            return bad("auth.mode must be \"password\" or \"open\"");
        }
        if !(50..=60_000).contains(&self.auth.revoke_poll_ms) {
            return bad("auth.revoke_poll_ms must be between 50 and 60000");
        }
        if self.auth.token_ttl_secs == 0 {
            return bad("auth.token_ttl_secs must be positive");
        }
        if !self.auth.secret.is_empty() && self.auth.secret.len() < 32 {
            return bad(
                "auth.secret must be at least 32 characters (or empty for a generated one)",
            );
        }
        for u in &self.server.public_url {
            if let Err(e) = crate::origins::Origin::parse_url(u) {
                return Err(ConfigError::Invalid(format!("server.public_url: {e}")));
            }
        }
        for o in self.auth.allowed_origins.iter().filter(|o| *o != "*") {
            if let Err(e) = crate::origins::Origin::parse_url(o) {
                return Err(ConfigError::Invalid(format!("auth.allowed_origins: {e}")));
            }
        }
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            return bad("tls.cert and tls.key must be set together");
        }
        if l.rate_per_sec > 0 && (l.rate_burst == 0 || l.rate_strikes == 0) {
            return bad("limits.rate_burst and rate_strikes must be positive when rate_per_sec is");
        }
        if l.flood_ban_after > 0 && l.flood_ban_secs == 0 {
            return bad("limits.flood_ban_secs must be positive when flood_ban_after is");
        }
        if l.ping_per_sec > 0 && (l.ping_burst == 0 || l.rate_strikes == 0) {
            return bad("limits.ping_burst and rate_strikes must be positive when ping_per_sec is");
        }
        if l.login_timeout_secs == 0 || l.login_max_failures == 0 || l.takeover_window_secs == 0 {
            return bad(
                "limits.login_timeout_secs, login_max_failures and takeover_window_secs must be positive",
            );
        }
        if l.login_user_max_failures == 0
            || l.login_user_window_secs == 0
            || l.login_backoff_secs == 0
            || l.login_backoff_max_secs < l.login_backoff_secs
        {
            return bad("limits.login_user_max_failures, login_user_window_secs and login_backoff_secs must be positive, and login_backoff_max_secs at least login_backoff_secs");
        }
        if l.login_throttle_max_keys < 100 || l.api_max_body_bytes < 1024 {
            return bad("limits.login_throttle_max_keys must be at least 100 and api_max_body_bytes at least 1024");
        }
        if l.register_per_ip > 0 && l.register_window_secs == 0 {
            return bad("limits.register_window_secs must be positive when register_per_ip is");
        }
        if l.prelogin_bytes < 4096 {
            return bad("limits.prelogin_bytes must be at least 4096 (a login frame with the longest password fits)");
        }
        Ok(())
    }
}

/// `PIGEON_LIMITS_MAILBOX_MAX=5` sets `[limits] mailbox_max = 5`. Values are read as
/// TOML (numbers, booleans) and fall back to strings. Returns which (section, key) came
/// from which variable, so an unknown one can be reported by its variable's name.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<std::collections::HashMap<(String, String), String>, ConfigError> {
    let mut from_env = std::collections::HashMap::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("PIGEON_") else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let Some((section, key)) = rest.split_once('_') else {
            continue;
        };
        if !SECTIONS.contains(&section) {
            continue; // PIGEON_TEST_* and friends belong to other tools
        }
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(value));
        match table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => {
                t.insert(key.to_string(), parsed);
            }
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "{name} sets a key of [{section}], but {section} is not a section in the file"
                )))
            }
        }
        from_env.insert((section.to_string(), key.to_string()), name);
    }
    Ok(from_env)
}

/// Keys of the built-in configuration, by section.
fn known_keys() -> toml::Table {
    match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    }
}

/// Unknown sections (`(section, None)`) and keys (`(section, Some(key))`) in `input`.
fn unknown_keys(input: &toml::Table) -> Vec<(String, Option<String>)> {
    let known = known_keys();
    let mut out = Vec::new();
    for (section, value) in input {
        match (known.get(section), value) {
            (Some(toml::Value::Table(k)), toml::Value::Table(v)) => {
                out.extend(
                    v.keys()
                        .filter(|key| !k.contains_key(*key))
                        .map(|key| (section.clone(), Some(key.clone()))),
                );
            }
            (Some(_), _) => {}
            (None, _) => out.push((section.clone(), None)),
        }
    }
    out
}

/// `unknown key [server] bnd in config.toml; did you mean bind?`
fn unknown_key_error(
    section: &str,
    key: Option<&str>,
    from_env: &std::collections::HashMap<(String, String), String>,
    file_name: &str,
) -> ConfigError {
    let known = known_keys();
    let Some(key) = key else {
        let hint = closest(section, known.keys().map(String::as_str))
            .map(|s| format!("; did you mean [{s}]?"))
            .unwrap_or_else(|| format!("; the sections are {}", SECTIONS.join(", ")));
        return ConfigError::UnknownKey {
            key: format!("section [{section}]"),
            source_name: file_name.to_string(),
            hint,
        };
    };
    let keys: Vec<&str> = match known.get(section) {
        Some(toml::Value::Table(t)) => t.keys().map(String::as_str).collect(),
        _ => Vec::new(),
    };
    let near = closest(key, keys.iter().copied());
    match from_env.get(&(section.to_string(), key.to_string())) {
        Some(var) => ConfigError::UnknownKey {
            key: format!("[{section}] {key}"),
            source_name: format!("environment variable {var}"),
            hint: near
                .map(|k| {
                    format!(
                        "; did you mean PIGEON_{}_{}?",
                        section.to_uppercase(),
                        k.to_uppercase()
                    )
                })
                .unwrap_or_default(),
        },
        None => ConfigError::UnknownKey {
            key: format!("[{section}] {key}"),
            source_name: file_name.to_string(),
            hint: near
                .map(|k| format!("; did you mean {k}?"))
                .unwrap_or_else(|| format!("; [{section}] has {}", keys.join(", "))),
        },
    }
}

/// The candidate nearest to `word` by edit distance, if it is near enough to be a typo.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(row[j + 1])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn env_overrides_and_types() {
        let (c, unknown) = Config::load(
            None,
            env(&[
                ("PIGEON_LIMITS_MAILBOX_MAX", "7"),
                ("PIGEON_SERVER_BIND", "127.0.0.1:0"),
                ("PIGEON_TEST_MONGODB_URI", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.limits.mailbox_max, 7);
        assert_eq!(c.server.bind.port(), 0);
        assert!(unknown.is_empty(), "{unknown:?}");
    }

    #[test]
    fn origin_lists_from_env_are_comma_separated() {
        let (c, unknown) = Config::load(
            None,
            env(&[
                (
                    "PIGEON_AUTH_ALLOWED_ORIGINS",
                    "http://a.example:3000, https://b.example,",
                ),
                ("PIGEON_SERVER_PUBLIC_URL", "https://chat.example"),
            ]),
        )
        .unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(
            c.auth.allowed_origins,
            ["http://a.example:3000", "https://b.example"]
        );
        assert_eq!(c.server.public_url, ["https://chat.example"]);
        let (c, _) = Config::load(
            None,
            env(&[("PIGEON_AUTH_ALLOWED_ORIGINS", r#"["http://a.example"]"#)]),
        )
        .unwrap();
        assert_eq!(c.auth.allowed_origins, ["http://a.example"]);
        assert!(Config::load(None, env(&[("PIGEON_AUTH_ALLOWED_ORIGINS", "a.example")])).is_err());
        assert!(Config::load(None, env(&[("PIGEON_SERVER_PUBLIC_URL", "ftp://x")])).is_err());
    }

    #[test]
    fn unknown_keys_stop_with_a_suggestion() {
        let e = Config::load(
            None,
            env(&[
                ("PIGEON_LIMITS_MAILBOX_MAXX", "1"),
                ("PIGEON_LOG_LEVEL", "debug"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "unknown key [limits] mailbox_maxx in environment variable PIGEON_LIMITS_MAILBOX_MAXX; \
             did you mean PIGEON_LIMITS_MAILBOX_MAX?"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[server]\nbnd = \"0.0.0.0:9\"\n").unwrap();
        let e = Config::load(Some(&path), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with(
                "[server] bnd in {}; did you mean bind?"
                    .replace("{}", &path.display().to_string())
                    .as_str()
            ),
            "{e}"
        );
        std::fs::write(&path, "[limts]\nmailbox_max = 1\n").unwrap();
        let e = Config::load(Some(&path), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("did you mean [limits]?"), "{e}");
        assert_eq!(edit_distance("bnd", "bind"), 1);
        assert_eq!(closest("zzzzzz", ["bind", "static_dir"].into_iter()), None);
    }

    #[test]
    fn bind_forms() {
        assert_eq!(
            parse_bind("127.0.0.1:80").unwrap(),
            "127.0.0.1:80".parse().unwrap()
        );
        assert_eq!(
            parse_bind("localhost:8080").unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            parse_bind(":8080").unwrap(),
            "0.0.0.0:8080".parse().unwrap()
        );
        assert_eq!(parse_bind("[::1]:9").unwrap(), "[::1]:9".parse().unwrap());
        let e = parse_bind("8080").unwrap_err();
        assert!(
            e.contains("localhost:8080") && e.contains(":8080 for every interface"),
            "{e}"
        );
        assert!(parse_bind("localhost:99999").is_err());
        let (c, _) = Config::load(None, env(&[("PIGEON_SERVER_BIND", ":7000")])).unwrap();
        assert_eq!(c.server.bind, "0.0.0.0:7000".parse().unwrap());
    }

    #[test]
    fn mongodb_keys_from_env() {
        let (c, unknown) = Config::load(
            None,
            env(&[
                ("PIGEON_STORAGE_BACKEND", "mongodb"),
                ("PIGEON_STORAGE_MONGODB_URI", "mongodb://db.example:27017"),
                ("PIGEON_STORAGE_MONGODB_DATABASE", "chat"),
                ("PIGEON_STORAGE_MONGODB_WRITE_CONCERN", "1"),
                ("PIGEON_STORAGE_OFFLINE_TTL_SECS", "3600"),
            ]),
        )
        .unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(c.storage.backend, "mongodb");
        assert_eq!(c.storage.mongodb_uri, "mongodb://db.example:27017");
        assert_eq!(c.storage.mongodb_database, "chat");
        assert_eq!(c.storage.mongodb_write_concern, "1");
        assert_eq!(c.storage.offline_ttl_secs, 3600);
        let d = Config::default();
        assert_eq!(d.storage.mongodb_uri, "mongodb://127.0.0.1:27017");
        assert_eq!(d.storage.mongodb_database, "pigeon");
        assert_eq!(d.storage.mongodb_write_concern, "majority");
        assert_eq!(d.storage.offline_ttl_secs, 0);
    }

    #[test]
    fn invalid_values_are_errors() {
        assert!(Config::load(None, env(&[("PIGEON_STORAGE_BACKEND", "redis")])).is_err());
        assert!(Config::load(None, env(&[("PIGEON_STORAGE_MONGODB_WRITE_CONCERN", "0")])).is_err());
        assert!(Config::load(None, env(&[("PIGEON_LIMITS_MAILBOX_MAX", "0")])).is_err());
        assert!(Config::load(None, env(&[("PIGEON_LOG_FORMAT", "xml")])).is_err());
        // A message above the write buffer limit could never be written back out.
        let too_big = env(&[
            ("PIGEON_LIMITS_MAX_MESSAGE_BYTES", "8388608"),
            ("PIGEON_LIMITS_BLOB_RELAY_BYTES", "16777216"),
        ]);
        assert!(Config::load(None, too_big).is_err());
    }

    #[test]
    fn shipped_config_parses_without_unknown_keys() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let (_, unknown) = Config::load(Some(&path), Vec::new()).unwrap();
        assert!(unknown.is_empty(), "{unknown:?}");
    }

    #[test]
    fn shipped_config_uses_passwords_while_built_in_default_is_open() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let (c, _) = Config::load(Some(&path), Vec::new()).unwrap();
        assert!(c.auth.password_mode());
        assert!(c.limits.rate_per_sec > 0);
        assert!(!Config::default().auth.password_mode());
        let (c, _) = Config::load(Some(&path), env(&[("PIGEON_AUTH_MODE", "open")])).unwrap();
        assert!(!c.auth.password_mode());
        assert!(Config::load(None, env(&[("PIGEON_AUTH_MODE", "maybe")])).is_err());
        assert!(Config::load(None, env(&[("PIGEON_TLS_CERT", "a.pem")])).is_err());
    }
}
