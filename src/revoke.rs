//! Ends live sessions whose account changed. `pigeon user passwd|del` (in this process
//! or any other, on any node sharing the store) appends the user to the store's account
//! change feed; this task reads the feed every `[auth] revoke_poll_ms` and stops each
//! local session of a changed user that logged in under another password hash than the
//! account's current one (`credentials_changed`), or whose account is gone
//! (`account_deleted`). Each node of a cluster polls the shared store, so a session ends
//! on whichever node holds it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::app::App;
use crate::auth::credential_stamp;
use crate::protocol::KickReason;
use crate::session::handle::StopReason;
use crate::store::StoreError;

/// Changes at most read per poll.
const BATCH: usize = 1000;
/// Changes below the cursor read again on every poll: with several writers (MongoDB) a
/// change may be numbered before, but written after, a higher one.
const OVERLAP: u64 = 256;
/// How long a change is checked again on every poll: a login whose hash was read just
/// before the change may register its session just after it.
const RECHECK_FOR: Duration = Duration::from_secs(10);

/// Polls until shutdown.
pub async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_millis(app.config.auth.revoke_poll_ms);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut feed: Option<Feed> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::shutdown::shutdown_requested(&mut shutdown) => return,
        }
        let result = match &mut feed {
            // Nobody is logged in yet at start: earlier changes concern nobody here.
            None => app.store.account_change_cursor().await.map(|cursor| {
                feed = Some(Feed {
                    cursor,
                    recent: BTreeMap::new(),
                });
            }),
            Some(f) => f.poll(&app).await,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "reading account changes failed; retrying");
        }
    }
}

/// Where this server is in the change feed.
struct Feed {
    /// The highest change seq seen.
    cursor: u64,
    /// Changes seen lately, by seq: the user, and when first seen.
    recent: BTreeMap<u64, (String, Instant)>,
}

impl Feed {
    async fn poll(&mut self, app: &App) -> Result<(), StoreError> {
        let now = Instant::now();
        let changes = app
            .store
            .account_changes(self.cursor.saturating_sub(OVERLAP), BATCH)
            .await?;
        for c in changes {
            self.cursor = self.cursor.max(c.seq);
            self.recent.entry(c.seq).or_insert((c.user, now));
        }
        let floor = self.cursor.saturating_sub(OVERLAP);
        self.recent
            .retain(|seq, (_, seen)| *seq >= floor || now.duration_since(*seen) < RECHECK_FOR);
        let mut users: Vec<&str> = self
            .recent
            .values()
            .filter(|(_, seen)| now.duration_since(*seen) < RECHECK_FOR)
            .map(|(u, _)| u.as_str())
            .collect();
        users.sort_unstable();
        users.dedup();
        for user in users {
            revoke_if_changed(app, user).await?;
        }
        Ok(())
    }
}

/// Stops `user`'s local session if its credentials are no longer the account's.
async fn revoke_if_changed(app: &App, user: &str) -> Result<(), StoreError> {
    let Some(session) = app.router.session(user) else {
        return Ok(());
    };
    let Some(stamp) = session.credential else {
        return Ok(()); // open mode: nothing was proved, nothing to revoke
    };
    let reason = match app.store.password_hash(user).await? {
        None => KickReason::AccountDeleted,
        Some(hash) if credential_stamp(&hash) != stamp => KickReason::CredentialsChanged,
        Some(_) => return Ok(()),
    };
    tracing::info!(%user, reason = reason.as_str(), "ending a session: the account changed");
    session.shared.stop(StopReason::Revoked(reason));
    Ok(())
}
