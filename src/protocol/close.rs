//! WebSocket close codes the server ends a session with (docs/PROTOCOL.md, "Close
//! codes"): the standard ones it uses and Pigeon's own 4000-range codes.

/// The server is shutting down (standard "going away").
pub const GOING_AWAY: u16 = 1001;
/// A frame over the size limits (standard "message too big").
pub const TOO_BIG: u16 = 1009;
/// The same user logged in on another connection (take-over).
pub const REPLACED: u16 = 4000;
/// The name in the URL is not a valid user name.
pub const INVALID_USER: u16 = 4001;
/// Too many bad frames in a row.
pub const PROTOCOL_ERROR: u16 = 4002;
/// Authentication required or failed (`auth_required`, `bad_credentials`, ...), or the
/// account changed under the session (`credentials_changed`, `account_deleted`).
pub const AUTH: u16 = 4003;
/// A flood: frames or pings beyond the rate limit.
pub const RATE_LIMITED: u16 = 4008;
/// The user was taken over too often lately (`takeover_loop`).
pub const TAKEOVER_LOOP: u16 = 4009;
/// No login within `limits.login_timeout_secs`.
pub const LOGIN_TIMEOUT: u16 = 4010;
