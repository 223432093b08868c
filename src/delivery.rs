//! Delivery: a message's way from its sender's session to its recipient. The store
//! accepts it first (its seq, retries, quotas, durability); then it goes to the
//! recipient's live session on this node, to the node that holds the recipient's session
//! (cluster mode), or nowhere: it waits in the mailbox for the next login. Sessions hand
//! their sends here; nothing else decides where a message goes.

use std::sync::Arc;

use crate::app::App;
use crate::message::StoredMessage;
use crate::metrics::inc;
use crate::protocol::{ErrorCode, Fate, ProtocolError};
use crate::store::{Enqueued, NewMessage, StoreError};

/// A sender's answer for one message: (seq, fate, duplicate), or why it was refused.
pub type Accepted = Result<(u64, Fate, bool), ProtocolError>;

/// Accepts a session's sends in one store round trip, in order, and routes each.
pub async fn accept_many(app: &App, batch: Vec<NewMessage>) -> Vec<Accepted> {
    let results = app.store.enqueue_many(batch.clone()).await;
    let mut answers = Vec::with_capacity(batch.len());
    for (msg, result) in batch.into_iter().zip(results) {
        answers.push(route(app, msg, result).await);
    }
    answers
}

/// Accepts one message: store first, then route.
pub async fn accept(app: &App, msg: NewMessage) -> Accepted {
    let result = app.store.enqueue(msg.clone()).await;
    route(app, msg, result).await
}

/// After the store answered for `msg`: hands a new message to its recipient.
async fn route(app: &App, msg: NewMessage, stored: Result<Enqueued, StoreError>) -> Accepted {
    match stored {
        Ok(Enqueued::New { seq }) => {
            let stored = Arc::new(StoredMessage {
                seq,
                sender: msg.sender,
                recipient: msg.recipient,
                client_id: msg.client_id,
                body: msg.body,
                accepted_at: msg.accepted_at,
            });
            let fate = match &app.cluster {
                Some(c) if !app.router.is_online(&stored.recipient) => {
                    match c.forward(&stored).await {
                        true => Fate::Delivered,
                        false => Fate::Stored,
                    }
                }
                _ => app.router.deliver(stored),
            };
            match fate {
                Fate::Delivered => inc(&app.metrics.messages_delivered),
                Fate::Stored => inc(&app.metrics.messages_stored),
            }
            Ok((seq, fate, false))
        }
        Ok(Enqueued::Duplicate { seq }) => {
            inc(&app.metrics.messages_duplicate);
            Ok((seq, Fate::Stored, true))
        }
        Err(e) => {
            let code = ErrorCode::from(&e);
            if code == ErrorCode::StoreUnavailable {
                inc(&app.metrics.store_errors);
                tracing::warn!(user = %msg.sender, error = %e, "enqueue failed");
            }
            Err(ProtocolError::new(code, e.to_string())
                .with_id(msg.client_id)
                .with_to(Some(msg.recipient)))
        }
    }
}
