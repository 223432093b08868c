//! `pigeon user add|del|passwd NAME`: account administration against the configured
//! store. The password is prompted for (twice, without echo) on a terminal, or read as
//! one line from standard input otherwise (`echo pw | pigeon user add bob`).

use std::io::{BufRead, IsTerminal};

use crate::auth::{self, AuthError};
use crate::config::Config;
use crate::names::{canonical_username, USERNAME_RULE};
use crate::store::{self, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Add,
    Delete,
    Passwd,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{0:?} is not a valid username: {USERNAME_RULE}")]
    InvalidUser(String),
    #[error("no such user: {0}")]
    NoSuchUser(String),
    #[error("the passwords do not match")]
    Mismatch,
    #[error("no password given on standard input")]
    NoPassword,
    #[error("reading the password: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How many names from before canonical names are listed at most (start-up refusal,
/// `pigeon user del`).
pub const LEGACY_LIST_MAX: usize = 1000;

/// Where the password comes from.
pub enum PasswordSource<'a> {
    /// A terminal prompt when standard input is a terminal, else its first line.
    Stdin,
    /// Given directly (tests, embedding).
    Given(&'a str),
}

/// Runs one account command and returns the line to print on success.
pub async fn run(
    config: &Config,
    action: Action,
    user: &str,
    source: PasswordSource<'_>,
) -> Result<String, AccountError> {
    let store = store::open(&config.storage, config.limits.mailbox_max).await?;
    if action == Action::Delete && canonical_username(user).as_deref() != Some(user) {
        // An account stored before names were canonical ("Alice"): deleted by its exact
        // name (the server refuses to start while one exists).
        if user.len() <= crate::names::MAX_USERNAME_INPUT_BYTES && store.delete_user(user).await? {
            return Ok(format!(
                "deleted user {user:?} (a name from before canonical names)"
            ));
        }
    }
    let canonical =
        canonical_username(user).ok_or_else(|| AccountError::InvalidUser(user.to_string()))?;
    let user = canonical.as_str();
    if action == Action::Delete {
        return if store.delete_user(user).await? {
            Ok(format!("deleted user {user} and the mail waiting for it"))
        } else {
            Err(AccountError::NoSuchUser(user.to_string()))
        };
    }
    if action == Action::Passwd && store.password_hash(user).await?.is_none() {
        return Err(AccountError::NoSuchUser(user.to_string()));
    }
    if action == Action::Add && store.password_hash(user).await?.is_some() {
        return Err(StoreError::UserExists(user.to_string()).into());
    }
    let password = match source {
        PasswordSource::Given(p) => p.to_string(),
        PasswordSource::Stdin => tokio::task::spawn_blocking(read_password)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??,
    };
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    match action {
        Action::Add => {
            store.create_user(user, &hash).await?;
            Ok(format!("added user {user}"))
        }
        _ => {
            if !store.set_password_hash(user, &hash).await? {
                return Err(AccountError::NoSuchUser(user.to_string()));
            }
            Ok(format!(
                "changed the password of {user} (tokens issued before are void)"
            ))
        }
    }
}

/// Prompts twice without echo on a terminal; otherwise reads one line of stdin.
fn read_password() -> Result<String, AccountError> {
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("password: ")?;
        let again = rpassword::prompt_password("again: ")?;
        if first != again {
            return Err(AccountError::Mismatch);
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let pw = line.strip_suffix('\n').unwrap_or(&line);
    let pw = pw.strip_suffix('\r').unwrap_or(pw);
    if pw.is_empty() {
        return Err(AccountError::NoPassword);
    }
    Ok(pw.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn add_passwd_delete_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.storage.data_dir = dir.path().to_path_buf();
        let given = PasswordSource::Given;
        run(&cfg, Action::Add, "bob", given("first pw"))
            .await
            .unwrap();
        assert!(matches!(
            run(&cfg, Action::Add, "bob", given("x")).await,
            Err(AccountError::Store(StoreError::UserExists(_)))
        ));
        let store = store::open(&cfg.storage, 10).await.unwrap();
        let h1 = store.password_hash("bob").await.unwrap().unwrap();
        assert!(auth::verify_password("first pw", &h1));
        run(&cfg, Action::Passwd, "bob", given("second pw"))
            .await
            .unwrap();
        let h2 = store.password_hash("bob").await.unwrap().unwrap();
        assert!(auth::verify_password("second pw", &h2) && !auth::verify_password("first pw", &h2));
        run(&cfg, Action::Delete, "bob", given("")).await.unwrap();
        assert_eq!(store.password_hash("bob").await.unwrap(), None);
        assert!(matches!(
            run(&cfg, Action::Delete, "bob", given("")).await,
            Err(AccountError::NoSuchUser(_))
        ));
        assert!(matches!(
            run(&cfg, Action::Passwd, "nobody", given("x")).await,
            Err(AccountError::NoSuchUser(_))
        ));
        assert!(matches!(
            run(&cfg, Action::Add, "a b", given("x")).await,
            Err(AccountError::InvalidUser(_))
        ));
    }
}
