//! Authentication: argon2 password hashes, signed session tokens (see `token`), the
//! server secret that signs them, and the failed-login throttle and take-over damper that
//! every login goes through. `Auth` lives in `App`; HTTP (`http::api`) and WebSocket
//! (`http::upgrade`, `session`) logins both call it.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::config::Config;
use crate::escape::Escaped;
use crate::limits::{
    Attempt, HashPool, LoginThrottle, PoolError, Refusal, TakeoverDamper, ThrottleLimits,
};
use crate::names::{canonical_username, valid_username, USERNAME_RULE};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::store::{Store, StoreError};
use crate::token::{self, TokenError, TokenKey};

/// Longest password accepted (bytes): hashing is deliberately slow, so bound the input.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Longest user name a login may name (bytes), checked before the name is used as a key
/// or logged. No account can have a longer one (`valid_username`: 32 characters).
pub const MAX_LOGIN_NAME_BYTES: usize = 128;
/// The file in the data directory holding the generated token secret.
pub const SECRET_FILE: &str = "auth_secret";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown user, wrong password, or a token that does not verify.
    #[error("wrong user name or password")]
    BadCredentials,
    #[error("{0}")]
    BadToken(TokenError),
    #[error("the session token has expired: log in again")]
    TokenExpired,
    #[error("too many failed logins: try again in {try_again_in} s")]
    Throttled { try_again_in: u64 },
    /// The failed-login bookkeeping is full (HTTP 429).
    #[error("too many logins from too many places: try again shortly")]
    ThrottleFull,
    /// The password-hashing queue is full (HTTP 503).
    #[error("the server is busy checking passwords: try again shortly")]
    HashBusy,
    #[error("{0}")]
    InvalidPassword(String),
    #[error("not a valid username: {USERNAME_RULE}")]
    InvalidUser,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("token secret {path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AuthError {
    /// The error frame a WebSocket client gets for this failure.
    pub fn to_protocol(&self) -> ProtocolError {
        let code = match self {
            AuthError::BadCredentials | AuthError::BadToken(_) | AuthError::InvalidPassword(_) => {
                ErrorCode::BadCredentials
            }
            AuthError::TokenExpired => ErrorCode::TokenExpired,
            AuthError::InvalidUser => ErrorCode::InvalidUser,
            AuthError::Throttled { .. } => ErrorCode::TooManyAttempts,
            AuthError::ThrottleFull | AuthError::HashBusy => ErrorCode::TooBusy,
            AuthError::Store(_) | AuthError::Hash(_) | AuthError::Secret { .. } => {
                ErrorCode::StoreUnavailable
            }
        };
        let wait = match self {
            AuthError::Throttled { try_again_in } => Some(*try_again_in),
            _ => None,
        };
        ProtocolError::new(code, self.to_string()).with_try_again_in(wait)
    }
}

/// A freshly issued session token.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The canonical name it was issued to.
    pub user: String,
    pub token: String,
    /// Unix seconds.
    pub expires_at: u64,
}

pub struct Auth {
    password_mode: bool,
    key: TokenKey,
    ttl_secs: u64,
    throttle: LoginThrottle,
    hashers: HashPool,
    takeovers: TakeoverDamper,
}

impl From<PoolError> for AuthError {
    fn from(e: PoolError) -> AuthError {
        match e {
            PoolError::Busy => AuthError::HashBusy,
            PoolError::Failed(m) => AuthError::Hash(m),
        }
    }
}

impl From<Refusal> for AuthError {
    fn from(r: Refusal) -> AuthError {
        match r {
            Refusal::Throttled(wait) => AuthError::Throttled {
                try_again_in: wait.as_secs().max(1),
            },
            Refusal::Full => AuthError::ThrottleFull,
        }
    }
}

impl Auth {
    /// Builds the authenticator from `[auth]` and `[limits]`, reading (or creating) the
    /// token secret in the data directory when `[auth] secret` is empty.
    pub fn new(config: &Config) -> Result<Auth, AuthError> {
        let secret = if config.auth.secret.is_empty() {
            load_or_create_secret(&config.storage.data_dir)?
        } else {
            config.auth.secret.as_bytes().to_vec()
        };
        let l = &config.limits;
        Ok(Auth {
            password_mode: config.auth.password_mode(),
            key: TokenKey::new(&secret),
            ttl_secs: config.auth.token_ttl_secs,
            throttle: LoginThrottle::new(ThrottleLimits {
                max: l.login_max_failures,
                backoff: Duration::from_secs(l.login_backoff_secs),
                backoff_max: Duration::from_secs(l.login_backoff_max_secs),
                user_max: l.login_user_max_failures,
                user_window: Duration::from_secs(l.login_user_window_secs),
                max_keys: l.login_throttle_max_keys,
            }),
            hashers: HashPool::new(l.hash_workers, l.hash_queue),
            takeovers: TakeoverDamper::new(
                l.takeover_max,
                Duration::from_secs(l.takeover_window_secs),
            ),
        })
    }

    /// True when users must prove who they are (`[auth] mode = "password"`).
    pub fn required(&self) -> bool {
        self.password_mode
    }

    /// Checks `user`'s password. Overlong names and passwords are refused before
    /// anything else; the name may be spelled in any form that canonicalizes
    /// (`protocol::canonical_username`); then the attempt is counted (per user, address
    /// and both) before the password is hashed on the bounded pool, and forgiven if it
    /// was right.
    pub async fn check_password(
        &self,
        store: &Arc<dyn Store>,
        user: &str,
        password: &str,
        ip: Option<IpAddr>,
    ) -> Result<Proof, AuthError> {
        if user.is_empty()
            || user.len() > MAX_LOGIN_NAME_BYTES
            || password.len() > MAX_PASSWORD_BYTES
        {
            tracing::debug!(user = %Escaped(user), ip = %crate::OrDash(&ip), "refused a login with an overlong name or password");
            return Err(AuthError::BadCredentials);
        }
        let user = &canonical_username(user).ok_or(AuthError::InvalidUser)?;
        let ticket = self
            .throttle
            .reserve(user, ip, Attempt::Password, Instant::now())?;
        match self.verify_stored(store, user, password).await {
            Ok(hash) => {
                self.throttle
                    .succeeded(ticket, Attempt::Password, Instant::now());
                Ok(Proof {
                    user: user.clone(),
                    credential: credential_stamp(&hash),
                    hash,
                })
            }
            Err(AuthError::BadCredentials) => {
                tracing::info!(user = %Escaped(user), ip = %crate::OrDash(&ip), "failed password login");
                Err(AuthError::BadCredentials)
            }
            Err(e) => {
                self.throttle.cancel(ticket);
                Err(e)
            }
        }
    }

    /// The stored hash of `user` if `password` matches it.
    async fn verify_stored(
        &self,
        store: &Arc<dyn Store>,
        user: &str,
        password: &str,
    ) -> Result<String, AuthError> {
        let stored = store.password_hash(user).await?;
        // An unknown user costs as much time as a wrong password: no user probing.
        let hash = stored.clone();
        let password = password.to_string();
        let ok = self
            .hashers
            .run(move || {
                verify_password(&password, hash.as_deref().unwrap_or_else(|| dummy_hash()))
            })
            .await?;
        match stored {
            Some(hash) if ok => Ok(hash),
            _ => Err(AuthError::BadCredentials),
        }
    }

    /// Hashes a new password on the bounded pool (registration).
    pub async fn hash_new_password(&self, password: &str) -> Result<String, AuthError> {
        if password.is_empty() || password.len() > MAX_PASSWORD_BYTES {
            return Err(AuthError::InvalidPassword(format!(
                "a password must be 1-{MAX_PASSWORD_BYTES} bytes"
            )));
        }
        let password = password.to_string();
        self.hashers.run(move || hash_password(&password)).await?
    }

    /// Checks the password and issues a token.
    pub async fn login(
        &self,
        store: &Arc<dyn Store>,
        user: &str,
        password: &str,
        ip: Option<IpAddr>,
    ) -> Result<Issued, AuthError> {
        let proof = self.check_password(store, user, password, ip).await?;
        Ok(self.issue(&proof.user, &proof.hash))
    }

    /// A token for `user`, whose current password hash is `hash`.
    pub fn issue(&self, user: &str, hash: &str) -> Issued {
        let expires_at = token::now_secs().saturating_add(self.ttl_secs);
        Issued {
            user: user.to_string(),
            token: self.key.sign(user, expires_at, hash),
            expires_at,
        }
    }

    /// The user a token was issued to, if it is genuine, unexpired, and the account
    /// still has the password it was issued under.
    pub async fn verify_token(
        &self,
        store: &Arc<dyn Store>,
        token: &str,
        ip: Option<IpAddr>,
    ) -> Result<Proof, AuthError> {
        let claims = token::parse(token).map_err(AuthError::BadToken)?;
        // Tokens are only ever issued to canonical names.
        if claims.user.len() > MAX_LOGIN_NAME_BYTES || !valid_username(&claims.user) {
            return Err(AuthError::BadToken(TokenError::BadSignature));
        }
        let ticket = self
            .throttle
            .reserve(&claims.user, ip, Attempt::Token, Instant::now())?;
        let hash = match store.password_hash(&claims.user).await {
            Ok(Some(hash)) => hash,
            Ok(None) => {
                self.throttle.failed(ticket, Instant::now());
                return Err(AuthError::BadToken(TokenError::BadSignature));
            }
            Err(e) => {
                self.throttle.cancel(ticket);
                return Err(e.into());
            }
        };
        match self.key.verify(&claims, &hash, token::now_secs()) {
            Ok(()) => {
                self.throttle
                    .succeeded(ticket, Attempt::Token, Instant::now());
                Ok(Proof {
                    user: claims.user,
                    credential: credential_stamp(&hash),
                    hash,
                })
            }
            Err(TokenError::Expired) => {
                self.throttle.cancel(ticket);
                Err(AuthError::TokenExpired)
            }
            Err(e) => {
                self.throttle.failed(ticket, Instant::now());
                tracing::info!(user = %Escaped(&claims.user), ip = %crate::OrDash(&ip), "rejected a forged or stale token");
                Err(AuthError::BadToken(e))
            }
        }
    }

    /// The signature of a download link for blob `key` (see `links`).
    pub fn sign_link(&self, key: &str, user: &str, expires_at: u64) -> String {
        self.key.sign_link(key, user, expires_at)
    }

    /// Checks a download link's signature and expiry.
    pub fn verify_link(
        &self,
        key: &str,
        user: &str,
        expires_at: u64,
        sig: &str,
    ) -> Result<(), TokenError> {
        self.key
            .verify_link(key, user, expires_at, sig, token::now_secs())
    }

    /// Records a take-over of `user`; false when it has been taken over too often lately
    /// and this login must be refused.
    pub fn allow_takeover(&self, user: &str) -> bool {
        self.takeovers.allow(user, Instant::now())
    }
}

/// Who a password or token proved to be, and under which credentials (no `Debug`: it
/// holds the hash).
#[derive(Clone)]
pub struct Proof {
    /// The canonical user name.
    pub user: String,
    /// `credential_stamp` of the password hash the proof was checked against.
    pub credential: u64,
    /// That hash (a PHC string; never logged).
    pub hash: String,
}

/// A short fingerprint of a password hash: a session remembers the one it logged in
/// under, and `revoke` ends it once the account's hash is another (or gone).
pub fn credential_stamp(hash: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(hash.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// An argon2id PHC string for `password` (slow on purpose: call off the async runtime).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    if password.is_empty() || password.len() > MAX_PASSWORD_BYTES {
        return Err(AuthError::InvalidPassword(format!(
            "a password must be 1-{MAX_PASSWORD_BYTES} bytes"
        )));
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Whether `password` matches the PHC string `hash` (false for an unparseable hash).
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A valid hash of a random password, to spend the same time on unknown users.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let mut pw = [0u8; 16];
        OsRng.fill_bytes(&mut pw);
        hash_password(&hex(&pw)).unwrap_or_default()
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads `<dir>/auth_secret`, or creates it (owner-only) with 32 random bytes.
pub fn load_or_create_secret(dir: &Path) -> Result<Vec<u8>, AuthError> {
    let path = dir.join(SECRET_FILE);
    let err = |source| AuthError::Secret {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 32 => return Ok(s.trim().as_bytes().to_vec()),
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "shorter than 32 characters",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    crate::store::private_files::private_dir(dir).map_err(err)?;
    let mut bytes = [0u8; 32];
    OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    let secret = hex(&bytes);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    match opts.open(&path) {
        Ok(mut f) => {
            f.write_all(secret.as_bytes()).map_err(err)?;
            f.sync_all().map_err(err)?;
            tracing::info!(path = %path.display(), "generated a new token secret");
            Ok(secret.into_bytes())
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let s = std::fs::read_to_string(&path).map_err(err)?;
            Ok(s.trim().as_bytes().to_vec())
        }
        Err(e) => Err(err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_only_their_password() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(!h.contains("correct horse"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct horsE", &h));
        assert!(!verify_password("x", "not a hash"));
        assert!(hash_password("").is_err());
    }

    #[test]
    fn secret_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_secret(dir.path()).unwrap();
        let b = load_or_create_secret(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "secret must be private: {mode:o}");
        }
    }
}
