//! The admin API's actions on clients, sessions, queues and retained messages. Each writes
//! one audit line ([`super::audit`]) whatever its result.
//!
//! What an action changes goes through the same paths as the protocol's own changes, so the
//! store and the other nodes of a cluster follow: a deleted session ends as an expired one
//! does (its store records and queue go, `Broker::end_session`), a deleted retained message is
//! cleared as a client clears one (an empty retained message, published by the broker), and a
//! purged queue drops its entries in memory and, in one store operation, on disk.

use super::{audit, Admin, ApiError, Caller};
use crate::broker::Broker;
use crate::message::Message;
use crate::protocol::{MqttStr, PublishProperties, QoS};
use crate::session::registry::Kicked;
use crate::storage::Op;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long `DELETE /sessions/{id}` waits for a connected client's connection to let go of
/// the session (it was told to leave; a connection takes at most its drain bound).
const DELETE_WAIT: Duration = Duration::from_secs(5);

fn done(caller: &Caller, action: &str, subject: &str, r: Result<Value, ApiError>) -> Response {
    let outcome = r
        .as_ref()
        .map(|v| v.to_string())
        .map_err(|e| ApiError::Failed(e.to_string()));
    audit(caller, action, subject, &outcome);
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
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
                let gone = broker.registry.view(id).is_none_or(|v| {
                    Some((v.handle.id, v.conn.map(|c| c.since_ms))) != before
                });
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

async fn act_on(admin: Admin, caller: Caller, action: Action, id: String) -> Response {
    let r = super::fleet::act(&admin, action, &id).await;
    done(&caller, action.name(), &id, r)
}

/// `DELETE /clients/{id}`: the client's connection is closed (v5: DISCONNECT 0x98
/// Administrative action); its session stays as its Session Expiry Interval says.
pub(super) async fn kick(
    State(admin): State<Admin>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    act_on(admin, caller, Action::Kick, id).await
}

/// `DELETE /sessions/{id}`: the session ends with its queue, subscriptions and stored state
/// (gone after a restart too); a connected client is closed first as by a kick.
pub(super) async fn delete_session(
    State(admin): State<Admin>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    act_on(admin, caller, Action::DeleteSession, id).await
}

/// Empties `queue` (a session's or a group's) in memory and on disk.
fn purge(broker: &Broker, queue: &crate::session::registry::SessionHandle) -> usize {
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

/// `POST /sessions/{id}/purge`: drops what waits in the session's queue (what is in flight
/// stays: the client has it).
pub(super) async fn purge_session(
    State(admin): State<Admin>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    act_on(admin, caller, Action::PurgeSession, id).await
}

/// `?key=` of `POST /groups/purge`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct GroupKey {
    key: String,
}

/// `POST /groups/purge?key=$share/g/f | $queue/NAME | $bridge/NAME`: drops what waits in
/// the group's own queue (what its members hold stays).
pub(super) async fn purge_group(
    State(admin): State<Admin>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<GroupKey>,
) -> Response {
    let r = match admin.broker.groups.get(&q.key) {
        None => Err(ApiError::NotFound(format!("no group {:?}", q.key))),
        Some(g) => {
            let n = purge(&admin.broker, &g.queue);
            Ok(json!({ "key": q.key, "purged": n }))
        }
    };
    done(&caller, "purge_group", &q.key, r)
}

/// `?topic=` of `DELETE /retained`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct Topic {
    topic: String,
}

/// `DELETE /retained?topic=T`: clears the retained message of `T` as a client would, by
/// publishing an empty retained message ([MQTT-3.3.1-6]); current subscribers of `T` receive
/// that empty message, as with a client's clear, and in a cluster every node's copy goes.
pub(super) async fn delete_retained(
    State(admin): State<Admin>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<Topic>,
) -> Response {
    let broker = &admin.broker;
    let topic = q.topic;
    let r = if !crate::protocol::validate::is_valid_topic_name(&topic) {
        Err(ApiError::BadRequest(format!(
            "{topic:?} is not a valid topic name"
        )))
    } else {
        let mut found = Vec::new();
        broker.retained_for(&topic, &mut found);
        if found.is_empty() {
            Err(ApiError::NotFound(format!(
                "no retained message on {topic:?}"
            )))
        } else {
            let msg = Arc::new(Message {
                id: broker.next_message_id(),
                topic: MqttStr::from(topic.as_str()),
                payload: Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: PublishProperties::default(),
                expires_at: None,
                origin: 0,
                received: Some(crate::clock::now()),
            });
            broker.publish_detached(&msg);
            Ok(json!({ "topic": topic, "deleted": true }))
        }
    };
    done(&caller, "delete_retained", &topic, r)
}
