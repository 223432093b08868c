//! Authentication: argon2 password hashes, signed session tokens (see `token`), the
//! server secret that signs them, and the failed-login throttle and take-over damper that
//! every login goes through. `Auth` lives in `App`; HTTP (`api`) and WebSocket (`http`,
//! `session`) logins both call it.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use crate::config::Config;
use crate::limits::{LoginThrottle, TakeoverDamper};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::store::{Store, StoreError};
use crate::token::{self, TokenError, TokenKey};

/// Longest password accepted (bytes): hashing is deliberately slow, so bound the input.
pub const MAX_PASSWORD_BYTES: usize = 1024;
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
    #[error("{0}")]
    InvalidPassword(String),
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
            AuthError::Throttled { .. } => ErrorCode::TooManyAttempts,
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
    pub token: String,
    /// Unix seconds.
    pub expires_at: u64,
}

pub struct Auth {
    password_mode: bool,
    key: TokenKey,
    ttl_secs: u64,
    throttle: LoginThrottle,
    takeovers: TakeoverDamper,
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
            throttle: LoginThrottle::new(
                l.login_max_failures,
                Duration::from_secs(l.login_backoff_secs),
            ),
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

    fn check_throttle(&self, user: &str, ip: Option<IpAddr>) -> Result<(), AuthError> {
        match self.throttle.blocked(user, ip, Instant::now()) {
            Some(wait) => Err(AuthError::Throttled {
                try_again_in: wait.as_secs().max(1),
            }),
            None => Ok(()),
        }
    }

    /// Checks `user`'s password (throttled per user and IP).
    pub async fn check_password(
        &self,
        store: &Arc<dyn Store>,
        user: &str,
        password: &str,
        ip: Option<IpAddr>,
    ) -> Result<String, AuthError> {
        self.check_throttle(user, ip)?;
        let stored = store.password_hash(user).await?;
        let ok = if password.len() > MAX_PASSWORD_BYTES {
            false
        } else {
            // An unknown user costs as much time as a wrong password: no user probing.
            let hash = stored.clone();
            let password = password.to_string();
            tokio::task::spawn_blocking(move || {
                verify_password(&password, hash.as_deref().unwrap_or_else(|| dummy_hash()))
            })
            .await
            .map_err(|e| AuthError::Hash(e.to_string()))?
                && stored.is_some()
        };
        match (ok, stored) {
            (true, Some(hash)) => {
                self.throttle.succeeded(user, ip);
                Ok(hash)
            }
            _ => {
                self.throttle.failed(user, ip, Instant::now());
                tracing::info!(%user, ?ip, "failed password login");
                Err(AuthError::BadCredentials)
            }
        }
    }

    /// Checks the password and issues a token.
    pub async fn login(
        &self,
        store: &Arc<dyn Store>,
        user: &str,
        password: &str,
        ip: Option<IpAddr>,
    ) -> Result<Issued, AuthError> {
        let hash = self.check_password(store, user, password, ip).await?;
        Ok(self.issue(user, &hash))
    }

    /// A token for `user`, whose current password hash is `hash`.
    pub fn issue(&self, user: &str, hash: &str) -> Issued {
        let expires_at = token::now_secs().saturating_add(self.ttl_secs);
        Issued {
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
    ) -> Result<String, AuthError> {
        let claims = token::parse(token).map_err(AuthError::BadToken)?;
        self.check_throttle(&claims.user, ip)?;
        let Some(hash) = store.password_hash(&claims.user).await? else {
            self.throttle.failed(&claims.user, ip, Instant::now());
            return Err(AuthError::BadToken(TokenError::BadSignature));
        };
        match self.key.verify(&claims, &hash, token::now_secs()) {
            Ok(()) => Ok(claims.user),
            Err(TokenError::Expired) => Err(AuthError::TokenExpired),
            Err(e) => {
                self.throttle.failed(&claims.user, ip, Instant::now());
                tracing::info!(user = %claims.user, ?ip, "rejected a forged or stale token");
                Err(AuthError::BadToken(e))
            }
        }
    }

    /// The signature of a download link for blob `key` (see `downloads`).
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
    std::fs::create_dir_all(dir).map_err(err)?;
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
