//! Cluster mode: several Pigeon nodes acting as one server through Redis.
//!
//! - **Presence**: `pigeon:presence:<user>` holds `<node>|<generation>` of the user's live
//!   session. A login claims it with one atomic script (a `SET … GET` that never lets an
//!   older session of the same node overwrite a newer one), which also returns the
//!   session it replaces; a session that ends deletes the key only if it still owns it.
//! - **Routing**: each node subscribes to `pigeon:node:<node>`. A message for a user who
//!   is live on another node is published there (it is already in the shared store, so
//!   a lost publish loses nothing: the recipient gets it from its mailbox). `PUBLISH`
//!   answers how many subscribers got it, so the sender's `delivered`/`stored` stays
//!   truthful, and a dead node (no subscriber) simply means `stored`.
//! - **Take-over across nodes**: the claiming node sends `kick` to the old owner, which
//!   stops that session (notice + close 4000) and answers `done` once it has finished;
//!   the new session starts its mailbox flush after that (or after `takeover_wait_ms`).
//! - **Losing Redis**: the node keeps serving its local users (cross-node messages go
//!   to the shared store), logs loudly, reports `degraded` on `/healthz`, reconnects,
//!   and re-claims its local sessions when Redis is back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::config::ClusterConfig;
use crate::message::{Body, StoredMessage};
use crate::metrics::{inc, ClusterFigures, Metrics};
use crate::router::Router;
use crate::session::handle::{KickWait, KickWaiters, StopReason};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster: cannot reach Redis at {url}: {source}")]
    Unreachable {
        url: String,
        source: redis::RedisError,
    },
}

/// The node holding a user's live session, as presence says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub node: String,
    pub generation: u64,
}

/// Node-to-node messages (JSON on the node's channel).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Wire {
    Deliver {
        seq: u64,
        sender: String,
        recipient: String,
        client_id: Option<String>,
        kind: i64,
        body: String,
        accepted_at: i64,
    },
    Kick {
        user: String,
        generation: u64,
        reply_to: String,
    },
    Done {
        user: String,
        generation: u64,
    },
    /// The node's own heartbeat through Redis.
    Ping,
}

/// How often a node checks its Redis connection and subscription.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Sets presence and returns what it replaced, unless this node already claimed the
/// user for a newer session (a claim that lost a race on its own node must not
/// overwrite the newer one: remote kicks would then miss the live session).
const CLAIM: &str = "
local old = redis.call('GET', KEYS[1])
if old then
  local node, gen = string.match(old, '^(.*)|(%d+)$')
  if node == ARGV[2] and tonumber(gen) > tonumber(ARGV[3]) then return false end
end
redis.call('SET', KEYS[1], ARGV[1])
return old
";

const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

pub struct Cluster {
    node: String,
    url: String,
    client: redis::Client,
    conn: ConnectionManager,
    /// The subscription made at start-up, until `run` takes it over.
    first_subscription: std::sync::Mutex<Option<redis::aio::PubSub>>,
    /// Take-overs waiting for a remote session to finish, by (user, its generation).
    waiting: Arc<KickWaiters>,
    degraded: AtomicBool,
    pub forwarded_out: AtomicU64,
    pub forwarded_in: AtomicU64,
    pub presence_conflicts: AtomicU64,
}

fn presence_key(user: &str) -> String {
    format!("pigeon:presence:{user}")
}

fn node_channel(node: &str) -> String {
    format!("pigeon:node:{node}")
}

fn owner_value(node: &str, generation: u64) -> String {
    format!("{node}|{generation}")
}

fn parse_owner(v: &str) -> Option<Owner> {
    let (node, generation) = v.rsplit_once('|')?;
    Some(Owner {
        node: node.to_string(),
        generation: generation.parse().ok()?,
    })
}

impl Cluster {
    /// Connects to Redis; a clear error when it cannot be reached.
    pub async fn connect(cfg: &ClusterConfig) -> Result<Arc<Cluster>, ClusterError> {
        let unreachable = |source| ClusterError::Unreachable {
            url: cfg.redis_url.clone(),
            source,
        };
        let client = redis::Client::open(cfg.redis_url.as_str()).map_err(unreachable)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(1))
            .set_number_of_retries(1);
        let mut conn = tokio::time::timeout(
            Duration::from_secs(5),
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| {
            unreachable(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection timed out",
            )))
        })?
        .map_err(unreachable)?;
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(unreachable)?;
        let node = if cfg.node_id.is_empty() {
            format!("{:x}-{:x}", std::process::id(), crate::now_ms())
        } else {
            cfg.node_id.clone()
        };
        // Subscribed before the server accepts anyone: a kick sent to this node as soon
        // as its first user logs in must find a listener.
        let mut pubsub = client.get_async_pubsub().await.map_err(unreachable)?;
        pubsub
            .subscribe(node_channel(&node))
            .await
            .map_err(unreachable)?;
        Ok(Arc::new(Cluster {
            node,
            url: cfg.redis_url.clone(),
            client,
            conn,
            first_subscription: std::sync::Mutex::new(Some(pubsub)),
            waiting: Arc::default(),
            degraded: AtomicBool::new(false),
            forwarded_out: AtomicU64::new(0),
            forwarded_in: AtomicU64::new(0),
            presence_conflicts: AtomicU64::new(0),
        }))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The node's counters for `/metrics`.
    pub fn figures(&self) -> ClusterFigures {
        ClusterFigures {
            forwarded_out: self.forwarded_out.load(Ordering::Relaxed),
            forwarded_in: self.forwarded_in.load(Ordering::Relaxed),
            presence_conflicts: self.presence_conflicts.load(Ordering::Relaxed),
            degraded: self.is_degraded(),
        }
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    fn lost(&self, what: &str, e: &redis::RedisError) {
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::error!(url = %self.url, error = %e, "cluster: Redis unreachable ({what}); serving local users only");
        }
    }

    /// Makes this node the owner of `user`'s session; returns the remote owner it
    /// replaced, if any (a local predecessor is the local router's business).
    pub async fn claim(&self, user: &str, generation: u64) -> Option<Owner> {
        if self.is_degraded() {
            return None; // re-claimed when Redis is back
        }
        let mut conn = self.conn.clone();
        let previous: Result<Option<String>, _> = redis::Script::new(CLAIM)
            .key(presence_key(user))
            .arg(owner_value(&self.node, generation))
            .arg(&self.node)
            .arg(generation)
            .invoke_async(&mut conn)
            .await;
        match previous {
            Ok(prev) => prev
                .as_deref()
                .and_then(parse_owner)
                .filter(|o| o.node != self.node),
            Err(e) => {
                self.lost("claim", &e);
                None
            }
        }
    }

    /// Asks `owner`'s node to stop `user`'s session there, now. The returned handle
    /// waits for that session to finish (its notice sent, its acks recorded).
    pub async fn kick(self: &Arc<Self>, owner: &Owner, user: &str) -> KickWait {
        inc(&self.presence_conflicts);
        let key = (user.to_string(), owner.generation);
        let notify = Arc::new(Notify::new());
        self.waiting.insert(key.clone(), notify.clone());
        let msg = Wire::Kick {
            user: user.to_string(),
            generation: owner.generation,
            reply_to: self.node.clone(),
        };
        // Nobody subscribed: the node is gone, there is nothing to wait for.
        let listening = self.publish(&owner.node, &msg).await > 0;
        KickWait::new(self.waiting.clone(), key, listening.then_some(notify))
    }

    /// Gives up presence of `user` if this session still holds it.
    pub async fn release(&self, user: &str, generation: u64) {
        if self.is_degraded() {
            return;
        }
        let mut conn = self.conn.clone();
        let r: Result<i64, _> = redis::Script::new(RELEASE)
            .key(presence_key(user))
            .arg(owner_value(&self.node, generation))
            .invoke_async(&mut conn)
            .await;
        if let Err(e) = r {
            self.lost("release", &e);
        }
    }

    /// Hands `msg` to the node where its recipient is live. True when a node took it.
    pub async fn forward(&self, msg: &StoredMessage) -> bool {
        if self.is_degraded() {
            return false; // in the shared store: delivered at the recipient's next login
        }
        let mut conn = self.conn.clone();
        let owner: Result<Option<String>, _> = conn.get(presence_key(&msg.recipient)).await;
        let owner = match owner {
            Ok(o) => o.as_deref().and_then(parse_owner),
            Err(e) => {
                self.lost("lookup", &e);
                return false;
            }
        };
        let Some(owner) = owner.filter(|o| o.node != self.node) else {
            return false;
        };
        let wire = Wire::Deliver {
            seq: msg.seq,
            sender: msg.sender.clone(),
            recipient: msg.recipient.clone(),
            client_id: msg.client_id.clone(),
            kind: msg.body.kind(),
            body: msg.body.as_str().to_string(),
            accepted_at: msg.accepted_at,
        };
        let taken = self.publish(&owner.node, &wire).await > 0;
        if taken {
            inc(&self.forwarded_out);
        }
        taken
    }

    /// Publishes to a node; returns how many subscribers received it (0 on errors).
    async fn publish(&self, node: &str, msg: &Wire) -> i64 {
        let Ok(payload) = serde_json::to_string(msg) else {
            return 0;
        };
        let mut conn = self.conn.clone();
        match conn.publish::<_, _, i64>(node_channel(node), payload).await {
            Ok(n) => n,
            Err(e) => {
                self.lost("publish", &e);
                0
            }
        }
    }

    /// Listens on this node's channel until shutdown, reconnecting to Redis as needed:
    /// forwarded messages go to `router`'s sessions, take-overs count in `metrics`.
    pub async fn run(
        self: Arc<Self>,
        router: Arc<Router>,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let node = Node { router, metrics };
        let mut backoff = Duration::from_millis(100);
        loop {
            let first = self
                .first_subscription
                .lock()
                .ok()
                .and_then(|mut f| f.take());
            let subscribed = match first {
                Some(pubsub) => Ok(pubsub),
                None => match self.client.get_async_pubsub().await {
                    Ok(mut pubsub) => pubsub
                        .subscribe(node_channel(&self.node))
                        .await
                        .map(|()| pubsub),
                    Err(e) => Err(e),
                },
            };
            match subscribed {
                Ok(mut pubsub) => {
                    self.recover(&node).await;
                    backoff = Duration::from_millis(100);
                    let mut messages = pubsub.on_message();
                    let mut heartbeat = tokio::time::interval(HEARTBEAT);
                    loop {
                        tokio::select! {
                            _ = crate::shutdown::shutdown_requested(&mut shutdown) => return,
                            // A ping to our own channel proves both directions work:
                            // no listener means our subscription died unnoticed.
                            _ = heartbeat.tick() => match self.publish(&self.node, &Wire::Ping).await {
                                0 => break,
                                _ => self.recover(&node).await,
                            },
                            m = messages.next() => match m {
                                Some(m) => {
                                    let payload: String = m.get_payload().unwrap_or_default();
                                    self.handle(&node, &payload).await;
                                }
                                None => break,
                            }
                        }
                    }
                    let e = redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "subscription ended",
                    ));
                    self.lost("subscription", &e);
                }
                Err(e) => self.lost("subscribe", &e),
            }
            tokio::select! {
                _ = crate::shutdown::shutdown_requested(&mut shutdown) => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Leaves the degraded state, if in it: re-claims every local session.
    async fn recover(self: &Arc<Self>, app: &Node) {
        if !self.degraded.swap(false, Ordering::Relaxed) {
            return;
        }
        tracing::warn!(url = %self.url, "cluster: Redis is back; re-claiming local sessions");
        for (user, generation) in app.router.users() {
            // A login elsewhere during the outage: the later one wins.
            if let Some(owner) = self.claim(&user, generation).await {
                drop(self.kick(&owner, &user).await);
            }
        }
    }

    async fn handle(self: &Arc<Self>, app: &Node, payload: &str) {
        let msg: Wire = match serde_json::from_str(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: unreadable node message");
                return;
            }
        };
        match msg {
            Wire::Deliver {
                seq,
                sender,
                recipient,
                client_id,
                kind,
                body,
                accepted_at,
            } => {
                inc(&self.forwarded_in);
                let msg = StoredMessage {
                    seq,
                    sender,
                    recipient,
                    client_id,
                    body: Body::from_parts(kind, body),
                    accepted_at,
                };
                app.router.deliver(Arc::new(msg));
            }
            Wire::Kick {
                user,
                generation,
                reply_to,
            } => {
                let session = app
                    .router
                    .session(&user)
                    .filter(|h| h.generation == generation);
                let done = Wire::Done { user, generation };
                match session {
                    Some(h) => {
                        inc(&app.metrics.takeovers);
                        h.shared.stop(StopReason::Replaced);
                        let me = self.clone();
                        tokio::spawn(async move {
                            h.shared.wait_done().await;
                            me.publish(&reply_to, &done).await;
                        });
                    }
                    None => {
                        self.publish(&reply_to, &done).await;
                    }
                }
            }
            Wire::Ping => {}
            Wire::Done { user, generation } => {
                if let Some(n) = self.waiting.get(&(user, generation)) {
                    n.notify_one();
                }
            }
        }
    }
}

/// What the listener acts on: this node's sessions and counters.
struct Node {
    router: Arc<Router>,
    metrics: Arc<Metrics>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_values_round_trip() {
        let v = owner_value("node-a|x", 42);
        assert_eq!(
            parse_owner(&v),
            Some(Owner {
                node: "node-a|x".into(),
                generation: 42
            })
        );
        assert_eq!(parse_owner("garbage"), None);
        assert_eq!(parse_owner("a|b"), None);
    }
}
