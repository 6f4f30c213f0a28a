//! The admin API's actions on clients, sessions, queues and retained messages. Each writes
//! one audit line ([`super::audit`]) whatever its result.
//!
//! What an action changes goes through the same paths as the protocol's own changes, so the
//! store and the other nodes of a cluster follow: a deleted session ends as an expired one
//! does (its store records and queue go, `Broker::end_session`), a deleted retained message is
//! cleared as a client clears one (an empty retained message, published by the broker), and a
//! purged queue drops its entries in memory and, in one store operation, on disk.

use super::here::{self, Action};
use super::{audited, Admin, ApiError, Caller};
use crate::message::Message;
use crate::protocol::{MqttStr, PublishProperties, QoS};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Extension;
use bytes::Bytes;
use serde_json::json;
use std::sync::Arc;

async fn act_on(admin: Admin, caller: Caller, action: Action, id: String) -> Response {
    let r = super::fleet::act(&admin, action, &id).await;
    audited(&caller, action.name(), &id, r)
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
            let n = here::purge(&admin.broker, &g.queue);
            Ok(json!({ "key": q.key, "purged": n }))
        }
    };
    audited(&caller, "purge_group", &q.key, r)
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
    audited(&caller, "delete_retained", &topic, r)
}
