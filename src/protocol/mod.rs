//! The wire: what a client may ask (`Request`), what the server tells (`Event`), and the
//! three dialects that put them into text frames. Everything here is pure: parse and
//! format functions with no I/O, so each dialect is unit-tested on its own.

pub mod close;
pub mod hash;
pub mod pigeon;
pub mod seed_json;

use crate::message::{BlobMeta, Body, StoredMessage};
use crate::names::{canonical_username, MAX_USERNAME_CHARS, USERNAME_RULE};
use crate::store::StoreError;

/// Longest client message id, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 128;

/// The wire dialect of one session, fixed once the session knows who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `from#body#to` text frames (seed tutorial).
    Hash,
    /// `{"to_user","msg"}` JSON frames on `/ws/<user>` (seed tutorial).
    SeedJson,
    /// Pigeon's own typed JSON frames.
    Pigeon,
}

impl Dialect {
    /// Legacy dialects cannot acknowledge: their messages count as received once written.
    pub fn acks_on_write(self) -> bool {
        !matches!(self, Dialect::Pigeon)
    }
}

/// `canonical_username`, or the `invalid_user` error naming `what` ("recipient", ...).
pub fn canonical_or_error(name: &str, what: &str) -> Result<String, ProtocolError> {
    canonical_username(name).ok_or_else(|| {
        let shown: String = name.chars().take(MAX_USERNAME_CHARS + 1).collect();
        ProtocolError::new(
            ErrorCode::InvalidUser,
            format!("{what} {shown:?} is not a valid username: {USERNAME_RULE}"),
        )
    })
}

/// Why the server ended a session from outside (the `kicked` notice and close reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    /// The same user logged in on another connection (close 4000).
    Replaced,
    /// The account's password was changed (close 4003).
    CredentialsChanged,
    /// The account was deleted (close 4003).
    AccountDeleted,
}

impl KickReason {
    pub fn as_str(self) -> &'static str {
        match self {
            KickReason::Replaced => "session_replaced",
            KickReason::CredentialsChanged => "credentials_changed",
            KickReason::AccountDeleted => "account_deleted",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            KickReason::Replaced => KICKED_MESSAGE,
            KickReason::CredentialsChanged => {
                "the password of this account was changed: log in again"
            }
            KickReason::AccountDeleted => "this account was deleted",
        }
    }
}

/// Why a frame was refused. Each maps to a stable wire code (see docs/PROTOCOL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadFrame,
    UnknownType,
    MissingField,
    EmptyField,
    InvalidUser,
    NotIdentified,
    AlreadyIdentified,
    WrongSender,
    TooLarge,
    Unsupported,
    MailboxFull,
    IdConflict,
    StoreUnavailable,
    BadAck,
    UnknownStream,
    BlobOverflow,
    ChecksumMismatch,
    TooManyTransfers,
    AuthRequired,
    BadCredentials,
    TokenExpired,
    TooManyAttempts,
    TakeoverLoop,
    RateLimited,
    LoginTimeout,
    TooBusy,
    NoSuchUser,
    QuotaExceeded,
    StoreFull,
    BlobTimeout,
}

/// The wire code a sender is refused with when the store refused its message.
impl From<&StoreError> for ErrorCode {
    fn from(e: &StoreError) -> ErrorCode {
        match e {
            StoreError::MailboxFull { .. } => ErrorCode::MailboxFull,
            StoreError::IdConflict { .. } => ErrorCode::IdConflict,
            StoreError::NoSuchUser { .. } => ErrorCode::NoSuchUser,
            StoreError::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
            StoreError::StoreFull { .. } => ErrorCode::StoreFull,
            _ => ErrorCode::StoreUnavailable,
        }
    }
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::EmptyField => "empty_field",
            ErrorCode::InvalidUser => "invalid_user",
            ErrorCode::NotIdentified => "not_identified",
            ErrorCode::AlreadyIdentified => "already_identified",
            ErrorCode::WrongSender => "wrong_sender",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::MailboxFull => "mailbox_full",
            ErrorCode::IdConflict => "id_conflict",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::BadAck => "bad_ack",
            ErrorCode::UnknownStream => "unknown_stream",
            ErrorCode::BlobOverflow => "blob_overflow",
            ErrorCode::ChecksumMismatch => "checksum_mismatch",
            ErrorCode::TooManyTransfers => "too_many_transfers",
            ErrorCode::AuthRequired => "auth_required",
            ErrorCode::BadCredentials => "bad_credentials",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TooManyAttempts => "too_many_attempts",
            ErrorCode::TakeoverLoop => "takeover_loop",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::LoginTimeout => "login_timeout",
            ErrorCode::TooBusy => "too_busy",
            ErrorCode::NoSuchUser => "no_such_user",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::StoreFull => "store_full",
            ErrorCode::BlobTimeout => "blob_timeout",
        }
    }
}

/// A refused frame: the code, a human sentence, and the client id it answers if known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
    pub id: Option<String>,
    pub to: Option<String>,
    /// Seconds to wait before trying again (`too_many_attempts`).
    pub try_again_in: Option<u64>,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ProtocolError {
        ProtocolError {
            code,
            message: message.into(),
            id: None,
            to: None,
            try_again_in: None,
        }
    }

    pub fn with_try_again_in(mut self, secs: Option<u64>) -> ProtocolError {
        self.try_again_in = secs;
        self
    }

    pub fn with_id(mut self, id: Option<String>) -> ProtocolError {
        self.id = id;
        self
    }

    pub fn with_to(mut self, to: Option<String>) -> ProtocolError {
        self.to = to;
        self
    }
}

/// A client's request, whatever dialect carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Login {
        user: String,
    },
    /// A Pigeon `login` frame with credentials: a password (with `user`) or a token.
    Authenticate {
        user: Option<String>,
        password: Option<String>,
        token: Option<String>,
    },
    Send {
        /// The sender named in the frame (hash dialect only).
        from: Option<String>,
        id: Option<String>,
        to: String,
        body: Body,
    },
    Ack {
        upto: u64,
    },
    Ping,
    /// Announces a blob whose bytes follow as binary frames on the stream the server
    /// assigns in `blob_accepted`.
    BlobStart {
        id: String,
        to: String,
        name: String,
        mime: String,
        size: u64,
        sha256: Option<String>,
    },
    /// The sender gives up a transfer.
    BlobAbort {
        stream: u32,
    },
}

/// What the server tells a send's sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Delivered,
    Stored,
}

impl Fate {
    pub fn as_str(self) -> &'static str {
        match self {
            Fate::Delivered => "delivered",
            Fate::Stored => "stored",
        }
    }
}

/// Something the server tells a session; each dialect formats it (or stays silent).
#[derive(Debug, Clone)]
pub enum Event<'a> {
    Welcome {
        user: &'a str,
        session: u64,
        pending: u64,
    },
    Message {
        msg: &'a StoredMessage,
        offline: bool,
    },
    Synced,
    Sent {
        id: Option<&'a str>,
        to: &'a str,
        seq: u64,
        fate: Fate,
        duplicate: bool,
    },
    Error(&'a ProtocolError),
    Kicked(KickReason),
    Pong,
    /// To a sender: `from` acknowledged every message up to its seq `upto`.
    Receipt {
        from: &'a str,
        upto: u64,
    },
    /// To a blob's sender: send its bytes on `stream`.
    BlobAccepted {
        id: &'a str,
        stream: u32,
    },
    /// A blob message to a legacy session, which gets files as a text notice naming the
    /// file and a download link (`url`), never as binary frames.
    FileNotice {
        msg: &'a StoredMessage,
        meta: &'a BlobMeta,
        url: &'a str,
        offline: bool,
    },
    /// To a blob's recipient: bytes follow on `stream`; `url` downloads them over HTTP.
    BlobStart {
        stream: u32,
        from: &'a str,
        to: &'a str,
        meta: &'a BlobMeta,
        url: Option<&'a str>,
        offline: bool,
    },
    /// To a blob's recipient: all bytes of `stream` were sent; acknowledge with `seq`.
    BlobEnd {
        stream: u32,
        seq: u64,
        ts: i64,
    },
    /// To a blob's recipient: `stream` stops here and will not complete.
    BlobAborted {
        stream: u32,
        reason: &'a str,
    },
}

/// How a blob is shown where only text can go (the legacy dialects). The name and type
/// come from the sender: control characters are replaced, and both are cut short.
pub fn blob_notice(meta: &BlobMeta) -> String {
    format!(
        "[file {} ({}, {} bytes)]",
        printable(&meta.name, 120),
        printable(&meta.mime, 80),
        meta.size
    )
}

/// `blob_notice` followed by the download link.
pub fn file_notice(meta: &BlobMeta, url: &str) -> String {
    format!("{} {url}", blob_notice(meta))
}

/// At most `max` characters of `s`, control characters as `?`.
fn printable(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The sender shown on server notices in the seed-JSON dialect (errors, take-over):
/// brackets are not allowed in usernames, so no user can pose as it.
pub const SERVER_NAME: &str = "[server]";

/// Binary frames of a blob transfer start with the stream number (4 bytes, big endian).
pub const CHUNK_HEADER: usize = 4;

/// Splits a binary frame into its stream number and payload.
pub fn split_chunk(frame: &[u8]) -> Result<(u32, &[u8]), ProtocolError> {
    match frame.split_first_chunk::<CHUNK_HEADER>() {
        Some((head, payload)) if !payload.is_empty() => Ok((u32::from_be_bytes(*head), payload)),
        _ => Err(ProtocolError::new(
            ErrorCode::BadFrame,
            "a blob chunk is a 4-byte stream number followed by at least one byte",
        )),
    }
}

/// Builds a binary frame for `stream`.
pub fn chunk_frame(stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(CHUNK_HEADER + payload.len());
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// The reason sent with a take-over.
pub const KICKED_MESSAGE: &str = "logged in from another connection";

/// Formats `event` for `dialect`, handing each text frame to `emit` (none when the
/// dialect has no frame for it, two for the hash dialect's `Out Line` + `send success`).
pub fn format(dialect: Dialect, event: &Event<'_>, mut emit: impl FnMut(String)) {
    match dialect {
        Dialect::Hash => {
            if let Event::Sent {
                fate: Fate::Stored, ..
            } = event
            {
                emit(hash::OUT_LINE.to_string());
            }
            if let Some(f) = hash::format(event) {
                emit(f);
            }
        }
        Dialect::SeedJson => {
            if let Some(f) = seed_json::format(event) {
                emit(f);
            }
        }
        Dialect::Pigeon => emit(pigeon::format(event)),
    }
}

/// Checks the fields every send needs, whatever its dialect; returns the recipient's
/// canonical name.
pub fn check_send(to: &str, id: Option<&str>) -> Result<String, ProtocolError> {
    if to.is_empty() {
        return Err(ProtocolError::new(
            ErrorCode::EmptyField,
            "recipient is empty",
        ));
    }
    let to = canonical_or_error(to, "recipient")?;
    if let Some(id) = id {
        if id.is_empty() || id.len() > MAX_CLIENT_ID_BYTES {
            return Err(ProtocolError::new(
                ErrorCode::EmptyField,
                format!("id must be 1-{MAX_CLIENT_ID_BYTES} bytes"),
            ));
        }
    }
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_frames_round_trip() {
        let f = chunk_frame(7, b"abc");
        assert_eq!(split_chunk(&f).unwrap(), (7, &b"abc"[..]));
        assert_eq!(
            split_chunk(&[0, 0, 0]).unwrap_err().code,
            ErrorCode::BadFrame
        );
        assert_eq!(
            split_chunk(&[0, 0, 0, 1]).unwrap_err().code,
            ErrorCode::BadFrame
        );
    }

    #[test]
    fn check_send_rejects_bad_fields() {
        assert_eq!(check_send("Bob", Some("1")).unwrap(), "bob");
        assert_eq!(
            check_send("", None).unwrap_err().code,
            ErrorCode::EmptyField
        );
        assert_eq!(
            check_send("b b", None).unwrap_err().code,
            ErrorCode::InvalidUser
        );
        let long = "x".repeat(MAX_CLIENT_ID_BYTES + 1);
        assert_eq!(
            check_send("bob", Some(&long)).unwrap_err().code,
            ErrorCode::EmptyField
        );
    }
}
