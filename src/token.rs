//! Session tokens: `<base64url(user)>.<expires_at>.<base64url(mac)>`, where `mac` is
//! HMAC-SHA256 under the server secret over the user, the expiry (Unix seconds) and the
//! account's current password hash. Binding the hash means changing a password or
//! deleting the account invalidates every token issued before. Pure functions: the
//! caller supplies the clock and the hash.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature is not valid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
}

/// The signing key.
#[derive(Clone)]
pub struct TokenKey(Vec<u8>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)") // never print the secret
    }
}

impl TokenKey {
    pub fn new(secret: &[u8]) -> TokenKey {
        TokenKey(secret.to_vec())
    }

    fn mac(&self, user: &str, expires_at: u64, password_hash: &str) -> HmacSha256 {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(b"pigeon-token-v1\0");
        mac.update(user.as_bytes());
        mac.update(b"\0");
        mac.update(expires_at.to_string().as_bytes());
        mac.update(b"\0");
        mac.update(password_hash.as_bytes());
        mac
    }

    /// A token for `user` valid until `expires_at` (Unix seconds).
    pub fn sign(&self, user: &str, expires_at: u64, password_hash: &str) -> String {
        let tag = self
            .mac(user, expires_at, password_hash)
            .finalize()
            .into_bytes();
        format!(
            "{}.{expires_at}.{}",
            URL_SAFE_NO_PAD.encode(user),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Checks the signature and expiry; `password_hash` is the account's current hash.
    pub fn verify(&self, token: &Claims, password_hash: &str, now: u64) -> Result<(), TokenError> {
        self.mac(&token.user, token.expires_at, password_hash)
            .verify_slice(&token.tag)
            .map_err(|_| TokenError::BadSignature)?;
        if now >= token.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

impl TokenKey {
    fn link_mac(&self, key: &str, user: &str, expires_at: u64) -> HmacSha256 {
        let mut mac = match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        // Another prefix than session tokens: a link's signature is never a token's.
        mac.update(b"pigeon-blob-v1\0");
        mac.update(key.as_bytes());
        mac.update(b"\0");
        mac.update(user.as_bytes());
        mac.update(b"\0");
        mac.update(expires_at.to_string().as_bytes());
        mac
    }

    /// The signature of a download link: blob `key`, for `user`, valid until `expires_at`.
    pub fn sign_link(&self, key: &str, user: &str, expires_at: u64) -> String {
        let tag = self.link_mac(key, user, expires_at).finalize().into_bytes();
        URL_SAFE_NO_PAD.encode(tag)
    }

    /// Checks a download link's signature (`sig`, base64url) and expiry.
    pub fn verify_link(
        &self,
        key: &str,
        user: &str,
        expires_at: u64,
        sig: &str,
        now: u64,
    ) -> Result<(), TokenError> {
        let tag = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        self.link_mac(key, user, expires_at)
            .verify_slice(&tag)
            .map_err(|_| TokenError::BadSignature)?;
        if now >= expires_at {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

/// A parsed, not yet verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub user: String,
    pub expires_at: u64,
    tag: Vec<u8>,
}

/// Splits a token into its parts (the user is needed to look up the password hash
/// before the signature can be checked).
pub fn parse(token: &str) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(user), Some(expires), Some(tag), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let user = URL_SAFE_NO_PAD
        .decode(user)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(TokenError::Malformed)?;
    let expires_at = expires.parse().map_err(|_| TokenError::Malformed)?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| TokenError::Malformed)?;
    Ok(Claims {
        user,
        expires_at,
        tag,
    })
}

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA";

    fn check(key: &TokenKey, token: &str, hash: &str, now: u64) -> Result<String, TokenError> {
        let c = parse(token)?;
        key.verify(&c, hash, now)?;
        Ok(c.user)
    }

    #[test]
    fn signed_token_verifies_until_it_expires() {
        let key = TokenKey::new(b"0123456789abcdef0123456789abcdef");
        let t = key.sign("zoë.b", 1000, HASH);
        assert_eq!(check(&key, &t, HASH, 999).unwrap(), "zoë.b");
        assert_eq!(check(&key, &t, HASH, 1000), Err(TokenError::Expired));
    }

    #[test]
    fn tampering_is_detected() {
        let key = TokenKey::new(b"0123456789abcdef0123456789abcdef");
        let t = key.sign("alice", 5000, HASH);
        let parts: Vec<&str> = t.split('.').collect();
        // Another user, a later expiry, a flipped signature byte.
        let other = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode("bob"),
            parts[1],
            parts[2]
        );
        assert_eq!(check(&key, &other, HASH, 1), Err(TokenError::BadSignature));
        let later = format!("{}.9999.{}", parts[0], parts[2]);
        assert_eq!(check(&key, &later, HASH, 1), Err(TokenError::BadSignature));
        let mut tag = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        tag[0] ^= 1;
        let flipped = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(tag));
        assert_eq!(
            check(&key, &flipped, HASH, 1),
            Err(TokenError::BadSignature)
        );
        // Another key, or a changed password, invalidates it as well.
        let key2 = TokenKey::new(b"another secret of enough length!");
        assert_eq!(check(&key2, &t, HASH, 1), Err(TokenError::BadSignature));
        assert_eq!(
            check(&key, &t, "$argon2id$other", 1),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn download_links_are_bound_to_key_user_and_expiry() {
        let key = TokenKey::new(b"0123456789abcdef0123456789abcdef");
        let sig = key.sign_link("k1", "bob", 100);
        assert_eq!(key.verify_link("k1", "bob", 100, &sig, 99), Ok(()));
        assert_eq!(
            key.verify_link("k1", "bob", 100, &sig, 100),
            Err(TokenError::Expired)
        );
        for (k, u, e) in [("k2", "bob", 100), ("k1", "eve", 100), ("k1", "bob", 101)] {
            assert_eq!(
                key.verify_link(k, u, e, &sig, 1),
                Err(TokenError::BadSignature)
            );
        }
        assert_eq!(
            key.verify_link("k1", "bob", 100, "!", 1),
            Err(TokenError::Malformed)
        );
        // A session token's signature is not a link's.
        let t = key.sign("bob", 100, "");
        let tag = t.rsplit('.').next().unwrap();
        assert!(key.verify_link("", "bob", 100, tag, 1).is_err());
    }

    #[test]
    fn garbage_is_malformed() {
        let key = TokenKey::new(b"k");
        for bad in ["", "a.b", "a.b.c.d", "!!.1.AA", "YQ.x.AA", "YQ.1.!!"] {
            assert_eq!(
                check(&key, bad, HASH, 0),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }
}
