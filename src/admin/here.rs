//! What this node answers about itself: its page of sessions or clients, one of its sessions,
//! and an action on a client it holds. The HTTP handlers (`read.rs`, `act.rs`) reach these
//! through `fleet.rs`, which in a cluster asks every node for the same.

use super::ApiError;
use crate::broker::Broker;
use crate::session::registry::{Kicked, Presence, SessionView};
use crate::storage::record::{unix_now_ms, SubscriptionRecord};
use crate::storage::Op;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long `DELETE /sessions/{id}` waits for a connected client's connection to let go of
/// the session (it was told to leave; a connection takes at most its drain bound).
const DELETE_WAIT: Duration = Duration::from_secs(5);

/// The node name in a cluster, else `null`.
fn node(broker: &Broker) -> Value {
    broker
        .peers()
        .map_or(Value::Null, |p| Value::from(p.node()))
}

fn client_json(broker: &Broker, v: &SessionView, now_s: u64) -> Value {
    let h = &v.handle;
    let (queued, _) = h.outbox.counts();
    let conn = v.conn.as_ref();
    json!({
        "client_id": &*h.client_id,
        "node": node(broker),
        "username": h.username().as_deref(),
        "protocol": conn.map(|c| c.protocol),
        "listener": conn.map(|c| c.listener),
        "address": conn.map(|c| c.peer.to_string()),
        "keep_alive": conn.map(|c| c.keep_alive),
        "connected_since_ms": conn.map(|c| c.since_ms),
        "persistent": h.persistent.load(Ordering::Relaxed),
        "session_expiry": v.expiry,
        "inflight": h.inflight.load(Ordering::Relaxed),
        "queued": queued,
        "oldest_age_seconds": broker.queue_oldest_age(h, now_s),
    })
}

fn session_json(broker: &Broker, v: &SessionView, now_s: u64) -> Value {
    let h = &v.handle;
    let (queued, _) = h.outbox.counts();
    json!({
        "client_id": &*h.client_id,
        "node": node(broker),
        "online": v.online,
        "username": h.username().as_deref(),
        "persistent": h.persistent.load(Ordering::Relaxed),
        "queued": queued,
        "inflight": h.inflight.load(Ordering::Relaxed),
        "oldest_age_seconds": broker.queue_oldest_age(h, now_s),
        "expires_in_seconds": v.expires_in,
        "subscriptions": h.subscriptions().len(),
    })
}

/// What a page lists.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Listing {
    /// Connected clients.
    Clients,
    Sessions(Presence),
    /// The subscriptions made with exactly this filter, one per session.
    Subscribers(String),
}

/// A page of this node's sessions or clients (in a cluster, `fleet.rs` merges every node's).
pub fn local_page(
    broker: &Broker,
    what: Listing,
    after: Option<&str>,
    limit: usize,
) -> (Vec<Value>, Option<String>) {
    let presence = match &what {
        Listing::Clients => Presence::Online,
        Listing::Sessions(p) => *p,
        Listing::Subscribers(_) => Presence::Any,
    };
    let (views, next) = broker.registry.page(after, limit, presence);
    let now = unix_now_ms() / 1000;
    let items = views
        .iter()
        .filter_map(|v| match &what {
            Listing::Clients => Some(client_json(broker, v, now)),
            Listing::Sessions(_) => Some(session_json(broker, v, now)),
            Listing::Subscribers(filter) => {
                let subs = v.handle.subscriptions();
                let s = subs.iter().find(|s| &s.filter == filter)?;
                Some(subscription_json(&v.handle.client_id, s))
            }
        })
        .collect();
    (items, next)
}

/// One client (`sessions` false) or session of this node, as `GET /clients/{id}` and
/// `GET /sessions/{id}` answer.
pub fn local_one(broker: &Broker, id: &str, sessions: bool) -> Result<Value, ApiError> {
    let now = unix_now_ms() / 1000;
    match broker.registry.view(id) {
        Some(v) if sessions => {
            let mut body = session_json(broker, &v, now);
            body["subscriptions"] = Value::from(
                v.handle
                    .subscriptions()
                    .iter()
                    .map(|s| subscription_json(&v.handle.client_id, s))
                    .collect::<Vec<_>>(),
            );
            Ok(body)
        }
        Some(v) if v.online => Ok(client_json(broker, &v, now)),
        _ if sessions => Err(ApiError::NotFound(format!("no session {id:?}"))),
        _ => Err(ApiError::NotFound(format!("no client {id:?} connected"))),
    }
}

fn subscription_json(client_id: &str, s: &SubscriptionRecord) -> Value {
    json!({
        "client_id": client_id,
        "filter": s.filter,
        "qos": s.options.qos as u8,
        "no_local": s.options.no_local,
        "retain_as_published": s.options.retain_as_published,
        "retain_handling": s.options.retain_handling,
        "subscription_id": s.id,
    })
}

/// What an action does on the node that holds the client (`fleet.rs` finds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Kick,
    DeleteSession,
    PurgeSession,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Kick => "kick",
            Action::DeleteSession => "delete_session",
            Action::PurgeSession => "purge_session",
        }
    }
}

/// Does `action` on `id` here: `NotFound` when this node has no such client or session.
pub async fn local(broker: &Arc<Broker>, action: Action, id: &str) -> Result<Value, ApiError> {
    match action {
        Action::Kick => match broker.registry.kick(id, false).0 {
            Kicked::Connected => Ok(json!({ "client_id": id, "kicked": true })),
            Kicked::Offline | Kicked::Unknown => {
                Err(ApiError::NotFound(format!("no client {id:?} connected")))
            }
        },
        Action::DeleteSession => delete_session_here(broker, id).await,
        Action::PurgeSession => match broker.registry.view(id) {
            None => Err(ApiError::NotFound(format!("no session {id:?}"))),
            Some(v) => Ok(json!({ "client_id": id, "purged": purge(broker, &v.handle) })),
        },
    }
}

async fn delete_session_here(broker: &Arc<Broker>, id: &str) -> Result<Value, ApiError> {
    // Which session (and connection) this is, to tell when it has gone.
    let before = broker
        .registry
        .view(id)
        .map(|v| (v.handle.id, v.conn.map(|c| c.since_ms)));
    match broker.registry.kick(id, true) {
        (Kicked::Unknown, _) | (Kicked::Offline, None) => {
            Err(ApiError::NotFound(format!("no session {id:?}")))
        }
        (Kicked::Offline, Some(ended)) => {
            let queued = ended.handle.outbox.counts().0;
            // Nobody is attached (the registry removed the entry under its lock): the state
            // is free, as for an expired session.
            match ended.state.try_lock() {
                Ok(mut state) => {
                    broker.end_session(&ended.handle, &mut state);
                    Ok(json!({ "client_id": id, "deleted": true, "queued": queued }))
                }
                Err(_) => Err(ApiError::Failed(
                    "the session's state is held; try again".into(),
                )),
            }
        }
        (Kicked::Connected, _) => {
            // The connection ends the session as it leaves (`Registry::detach`).
            let deadline = tokio::time::Instant::now() + DELETE_WAIT;
            loop {
                // Gone, or a new connection of the same client has started afresh.
                let gone = broker
                    .registry
                    .view(id)
                    .is_none_or(|v| Some((v.handle.id, v.conn.map(|c| c.since_ms))) != before);
                if gone {
                    break Ok(json!({ "client_id": id, "deleted": true, "kicked": true }));
                }
                if tokio::time::Instant::now() >= deadline {
                    break Err(ApiError::Failed(
                        "the client was told to leave but its connection has not let go yet; \
                         the session ends when it does"
                            .into(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Empties `queue` (a session's or a group's) in memory and on disk.
pub(super) fn purge(broker: &Broker, queue: &crate::session::registry::SessionHandle) -> usize {
    let (n, below) = queue.outbox.purge();
    if broker.store.durable() && queue.persistent.load(Ordering::Relaxed) {
        // Fire and forget, as a session's deletion: nothing is acknowledged on its strength,
        // and the storage thread applies it before anything submitted later.
        let _ = broker.store.submit(vec![Op::PurgeQueue {
            session_id: queue.id,
            below,
        }]);
    }
    if n > 0 {
        broker.metrics.dropped_purged.inc_by(n as u64);
    }
    n
}
