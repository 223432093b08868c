//! How a session learns its user: the URL's name (already checked by the upgrade), a
//! `login` frame (password, token, or a name in open mode), or a hash frame's sender;
//! then `identify` registers the user, taking over an older session.

use super::reader::Reader;

use super::handle::{Outgoing, SessionHandle, Start, StopReason};
use super::Flow;
use crate::escape::Escaped;
use crate::metrics::inc;
use crate::names::canonical_username;
use crate::protocol::{canonical_or_error, close, Dialect, ErrorCode, ProtocolError};

impl Reader {
    /// Claims `user` for this session: registers it (taking over any older session) and
    /// tells the writer to start delivering.
    pub(super) async fn identify(
        &mut self,
        user: String,
        dialect: Dialect,
        from_url: bool,
    ) -> Flow {
        let user = match canonical_or_error(&user, "user") {
            Ok(user) => user,
            Err(e) if from_url => {
                self.refuse(dialect, e).await;
                return self.close(close::INVALID_USER, "invalid_user").await;
            }
            Err(e) => return self.refuse(dialect, e).await,
        };
        if self.app.router.is_online(&user) && !self.app.auth.allow_takeover(&user) {
            tracing::warn!(
                user = %Escaped(&user),
                max = self.app.config.limits.takeover_max,
                window_secs = self.app.config.limits.takeover_window_secs,
                "login refused: this user is being taken over in a loop"
            );
            let e = ProtocolError::new(
                ErrorCode::TakeoverLoop,
                format!(
                    "{user} was taken over too often lately; is another client fighting over this account?"
                ),
            );
            return self
                .refuse_and_close(dialect, e, close::TAKEOVER_LOOP)
                .await;
        }
        let _ = self.shared.dialect.set(dialect);
        self.generation = self.app.router.next_generation();
        let handle = SessionHandle {
            generation: self.generation,
            credential: self.credential,
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        };
        let replaced = self.app.router.register(&user, handle).map(|old| {
            inc(&self.app.metrics.takeovers);
            tracing::info!(user = %Escaped(&user), old = old.generation, new = self.generation, "session taken over");
            old.shared.stop(StopReason::Replaced);
            old.shared
        });
        tracing::debug!(user = %Escaped(&user), generation = self.generation, ?dialect, "session identified");
        if let Some(wire) = &self.read_budget {
            wire.unlimit_reads();
        }
        self.user = Some(user.clone());
        self.dialect = Some(dialect);
        self.errors_in_row = 0;
        // The kick goes out now, not when the writer starts: this session may itself be
        // replaced before then, and the session it replaced must still be stopped.
        let replaced_remote = match &self.app.cluster {
            Some(c) => match c.claim(&user, self.generation).await {
                Some(owner) => Some(c.kick(&owner, &user).await),
                None => None,
            },
            None => None,
        };
        let start = Outgoing::Start(Box::new(Start {
            user,
            dialect,
            generation: self.generation,
            replaced,
            replaced_remote,
        }));
        self.push(start).await
    }

    /// A `login` frame without credentials: only in open mode, or naming the user a
    /// token in the URL already proved.
    pub(super) async fn login(&mut self, user: String) -> Flow {
        match &self.authenticated {
            Some(me) if canonical_username(&user).as_ref() == Some(me) => {
                self.identify(user, Dialect::Pigeon, false).await
            }
            Some(me) => {
                let e = ProtocolError::new(
                    ErrorCode::BadCredentials,
                    format!("this connection's token was issued to {me}, not to {user:?}"),
                );
                self.refuse_and_close(Dialect::Pigeon, e, close::AUTH).await
            }
            None if self.app.auth.required() => {
                let e = ProtocolError::new(
                    ErrorCode::AuthRequired,
                    "this server needs a password or token: {\"type\":\"login\",\"user\":...,\"password\":...}",
                );
                self.refuse_and_close(Dialect::Pigeon, e, close::AUTH).await
            }
            None => self.identify(user, Dialect::Pigeon, false).await,
        }
    }

    /// A `login` frame with a password (and user) or a token.
    pub(super) async fn authenticate(
        &mut self,
        user: Option<String>,
        password: Option<String>,
        token: Option<String>,
    ) -> Flow {
        let (app, ip) = (self.app.clone(), self.peer);
        // In open mode anyone may claim any name: a client that brings a password anyway
        // (`pigeon chat --password`) is not refused for it.
        if let (Some(u), None, false) = (&user, &token, app.auth.required()) {
            return self.identify(u.clone(), Dialect::Pigeon, false).await;
        }
        let proved = match (&user, password, token) {
            (_, _, Some(t)) => app.auth.verify_token(&app.store, &t, ip).await,
            (Some(u), Some(p), None) => app.auth.check_password(&app.store, u, &p, ip).await,
            _ => Err(crate::auth::AuthError::BadCredentials),
        };
        match proved {
            Ok(proof)
                if user
                    .as_ref()
                    .is_none_or(|u| canonical_username(u).as_ref() == Some(&proof.user)) =>
            {
                self.credential = Some(proof.credential);
                self.identify(proof.user, Dialect::Pigeon, false).await
            }
            Ok(proof) => {
                let e = ProtocolError::new(
                    ErrorCode::BadCredentials,
                    format!(
                        "the token was issued to {}, not to the user named",
                        proof.user
                    ),
                );
                self.refuse_and_close(Dialect::Pigeon, e, close::AUTH).await
            }
            Err(e) => {
                self.refuse_and_close(Dialect::Pigeon, e.to_protocol(), close::AUTH)
                    .await
            }
        }
    }

    /// Whether the first hash frame's sender may identify this session: `None` when it
    /// may, else how the refusal went.
    pub(super) async fn check_hash_sender(&mut self, from: &str) -> Option<Flow> {
        match &self.authenticated {
            Some(me) if me == from => None,
            Some(me) => {
                let e = ProtocolError::new(
                    ErrorCode::WrongSender,
                    format!("this session belongs to {me}"),
                );
                Some(self.refuse(Dialect::Hash, e).await)
            }
            None if self.app.auth.required() => {
                let e = ProtocolError::new(
                    ErrorCode::AuthRequired,
                    "open /ws?token=... (from POST /api/login) to use the hash dialect",
                );
                Some(self.refuse_and_close(Dialect::Hash, e, close::AUTH).await)
            }
            None => None,
        }
    }
}
