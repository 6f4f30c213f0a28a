//! CONNECT → CONNACK: checks, authentication, session attach, and what CONNACK advertises.

use super::handlers::Client;
use crate::auth::Authentication;
use crate::broker::Broker;
use crate::config::Limits;
use crate::protocol::*;
use crate::session::registry::Kick;
use crate::session::TopicAliases;
use crate::storage::record::{SessionRecord, WillRecord};
use crate::storage::Op;
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a new connection waits for a previous one with the same ClientId to let go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

fn refuse(
    broker: &Broker,
    wbuf: &mut BytesMut,
    version: ProtocolVersion,
    reason: ReasonCode,
    peer: SocketAddr,
    why: &str,
) -> Option<Client> {
    encode_connack(wbuf, version, false, reason, &Properties::default());
    broker.metrics.packets_sent.add(kind::CONNACK, 1);
    if matches!(
        reason,
        ReasonCode::NotAuthorized
            | ReasonCode::BadUserNameOrPassword
            | ReasonCode::BadAuthenticationMethod
    ) {
        broker.metrics.refused_auth.inc();
    } else {
        broker.metrics.refused_protocol.inc();
    }
    tracing::info!(%peer, reason = reason.as_u8(), "connection refused: {why}");
    None
}

/// A ClientId for a client that sent none ([MQTT-3.1.3-6]): unique within this broker run.
fn assign_client_id(conn_id: u64) -> String {
    static EPOCH: AtomicU64 = AtomicU64::new(0);
    let mut epoch = EPOCH.load(Ordering::Relaxed);
    if epoch == 0 {
        epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1)
            | 1;
        EPOCH.store(epoch, Ordering::Relaxed);
    }
    format!("tern-{epoch:x}-{conn_id:x}")
}

/// Handles CONNECT. On success the CONNACK (and any re-sent in-flight messages) are in `wbuf`
/// and the session is attached; on refusal `wbuf` holds the refusing CONNACK.
pub(super) async fn accept(
    broker: &Arc<Broker>,
    wbuf: &mut BytesMut,
    packet: Packet,
    peer: SocketAddr,
    kick: oneshot::Sender<Kick>,
    identity: Option<String>,
    limits: Arc<Limits>,
) -> Option<Client> {
    let Packet::Connect(c) = packet else {
        return None;
    };
    broker.metrics.packets_received.add(kind::CONNECT, 1);
    let c = *c;
    let version = c.version;
    let v5 = version.is_v5();

    if v5 && c.properties.authentication_method.is_some() {
        // No enhanced authentication methods are supported.
        return refuse(
            broker,
            wbuf,
            version,
            ReasonCode::BadAuthenticationMethod,
            peer,
            "unsupported authentication method",
        );
    }
    // A certificate-authenticated identity replaces whatever username the client sent.
    let username: Option<Arc<str>> = match &identity {
        Some(cn) => Some(Arc::from(cn.as_str())),
        None => c.username.as_ref().map(|u| Arc::from(u.as_str())),
    };
    if identity.is_none() {
        let user = c.username.as_ref().map(|u| u.as_str());
        match broker.auth.authenticate(user, c.password.as_deref()) {
            Authentication::Accepted => {}
            Authentication::NotAuthorized => {
                broker.metrics.auth_failures.inc();
                return refuse(
                    broker,
                    wbuf,
                    version,
                    ReasonCode::NotAuthorized,
                    peer,
                    "anonymous clients are not allowed",
                );
            }
            Authentication::BadCredentials => {
                broker.metrics.auth_failures.inc();
                return refuse(
                    broker,
                    wbuf,
                    version,
                    ReasonCode::BadUserNameOrPassword,
                    peer,
                    "bad user name or password",
                );
            }
        }
    }

    if let Some(w) = &c.will {
        let cid = c.client_id.as_str();
        let topic = w.topic.as_str();
        if topic.len() > limits.max_topic_length
            || topic.bytes().filter(|&b| b == b'/').count() >= limits.max_topic_levels
        {
            return refuse(
                broker,
                wbuf,
                version,
                ReasonCode::TopicNameInvalid,
                peer,
                "will topic over limits.max_topic_length or limits.max_topic_levels",
            );
        }
        if !broker
            .auth
            .can_publish(username.as_deref(), cid, w.topic.as_str())
        {
            return refuse(
                broker,
                wbuf,
                version,
                ReasonCode::NotAuthorized,
                peer,
                "will topic not authorised",
            );
        }
    }
    let conn_id = broker.next_connection_id();
    let mut assigned = None;
    let client_id: Arc<str> = if c.client_id.is_empty() {
        if !v5 && !c.clean_start {
            // [MQTT-3.1.3-8]
            return refuse(
                broker,
                wbuf,
                version,
                ReasonCode::ClientIdentifierNotValid,
                peer,
                "empty client id with a persistent session",
            );
        }
        let id = assign_client_id(conn_id);
        assigned = Some(id.clone());
        Arc::from(id)
    } else {
        Arc::from(c.client_id.as_str())
    };

    let requested_expiry = if v5 {
        c.properties.session_expiry_interval.unwrap_or(0)
    } else if c.clean_start {
        0
    } else {
        u32::MAX
    };
    let session_expiry = requested_expiry.min(limits.max_session_expiry);

    let mut keep_alive = c.keep_alive;
    let mut server_keep_alive = None;
    if v5 && limits.max_keepalive != 0 && (keep_alive == 0 || keep_alive > limits.max_keepalive) {
        keep_alive = limits.max_keepalive;
        server_keep_alive = Some(keep_alive);
    }

    let mut attached = match broker
        .registry
        .attach(&client_id, conn_id, session_expiry, kick, TAKEOVER_WAIT)
        .await
    {
        Ok(a) => a,
        Err(e) => {
            // Detach what we claimed so the entry does not stay attached to nobody.
            broker
                .registry
                .detach(&client_id, conn_id, session_expiry.max(1));
            return refuse(
                broker,
                wbuf,
                version,
                ReasonCode::ServerBusy,
                peer,
                &e.to_string(),
            );
        }
    };
    let session_present = attached.existed && !c.clean_start;
    let stored_before = attached
        .handle
        .persistent
        .load(std::sync::atomic::Ordering::Relaxed);
    if !session_present {
        // [MQTT-3.1.2-4] a clean start discards the previous session; so does a session that
        // ended with its previous connection.
        broker.end_session(&attached.handle, &mut attached.state);
    }
    // The commit CONNACK waits for: Session Present promises a state, so the state it
    // describes is stored first. Without this, a crash right after a CONNACK saying "no
    // session" could bring the deleted session back, and its QoS 2 messages the client has
    // already received (and forgotten with its session) would arrive again as new.
    let mut connack_commit = None;
    if broker.store.durable() {
        let persistent = session_expiry > 0;
        attached
            .handle
            .persistent
            .store(persistent, std::sync::atomic::Ordering::Relaxed);
        if persistent {
            // Ordered before everything this connection stores later.
            connack_commit = Some(broker.store.submit(vec![Op::PutSession(SessionRecord {
                client_id: client_id.to_string(),
                session_id: attached.handle.id,
                expiry_interval: session_expiry,
                disconnected_at_ms: None,
                will: c.will.as_ref().map(WillRecord::from),
                username: username.as_deref().map(str::to_string),
            })]));
        } else if stored_before && !session_present {
            // The stored session was deleted just now: wait for the deletion.
            connack_commit = Some(broker.store.submit(Vec::new()));
        }
    }
    attached.handle.set_username(username.clone());
    attached.handle.outbox.set_online(true);

    let mut props = Properties::default();
    if v5 {
        let cfg = &broker.config;
        if session_expiry != requested_expiry {
            props.session_expiry_interval = Some(session_expiry);
        }
        props.receive_maximum = Some(limits.receive_maximum);
        if cfg.mqtt.max_qos < 2 {
            props.maximum_qos = Some(cfg.mqtt.max_qos);
        }
        props.retain_available = Some(u8::from(cfg.mqtt.retain_available));
        props.maximum_packet_size = Some(limits.max_packet_size);
        props.assigned_client_identifier = assigned.map(MqttStr::from);
        if cfg.mqtt.topic_alias_maximum > 0 {
            props.topic_alias_maximum = Some(cfg.mqtt.topic_alias_maximum);
        }
        props.wildcard_subscription_available = Some(1);
        props.subscription_identifier_available = Some(1);
        props.shared_subscription_available = Some(1);
        props.server_keep_alive = server_keep_alive;
        if c.properties.request_response_information == Some(1) {
            props.response_information = broker
                .auth
                .response_information(&client_id)
                .map(MqttStr::from);
        }
    }
    let connack_at = wbuf.len();
    encode_connack(wbuf, version, session_present, ReasonCode::Success, &props);
    broker.metrics.packets_sent.add(kind::CONNACK, 1);
    broker.metrics.connections_total.inc();

    let window = usize::from(limits.max_inflight).min(usize::from(
        c.properties.receive_maximum.unwrap_or(u16::MAX),
    ));
    let max_packet_out = c
        .properties
        .maximum_packet_size
        .map_or(usize::MAX, |m| m as usize);
    let aliases = if v5 {
        TopicAliases::new(
            broker.config.mqtt.topic_alias_maximum,
            c.properties.topic_alias_maximum.unwrap_or(0),
        )
    } else {
        TopicAliases::default()
    };
    let mut client = Client::new(
        broker.clone(),
        version,
        client_id,
        c.clean_start,
        conn_id,
        attached.handle,
        attached.state,
        keep_alive,
        session_expiry,
        requested_expiry,
        c.will,
        window,
        max_packet_out,
        aliases,
        limits,
    );
    client.username = username;
    client.gate.hold_commit(connack_at, connack_commit);
    if session_present {
        client.attach_groups();
        client.resend_inflight(wbuf);
    }
    Some(client)
}
