//! CONNECT → CONNACK: checks, authentication, session attach, and what CONNACK advertises.

use super::client::Client;
use super::client::Extras;
use super::entry::Entry;
use super::Origin;
use crate::auth::chain::{Credentials, Denial};
use crate::broker::Broker;
use crate::protocol::*;
use crate::session::registry::Kick;
use crate::session::TopicAliases;
use crate::storage::record::{SessionRecord, WillRecord};
use crate::storage::Op;
use bytes::BytesMut;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a new connection waits for a previous one with the same ClientId to let go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// Refuses the connection with a CONNACK carrying `reason`, unless even that bare CONNACK is
/// larger than the client's Maximum Packet Size `max_out` ([MQTT-3.1.2-24]): then the
/// connection is closed without it.
fn refuse(
    broker: &Broker,
    wbuf: &mut BytesMut,
    c: &Connect,
    max_out: usize,
    reason: ReasonCode,
    origin: Origin,
    why: &str,
) -> Option<Client> {
    let counted = if matches!(
        reason,
        ReasonCode::NotAuthorized
            | ReasonCode::BadUserNameOrPassword
            | ReasonCode::BadAuthenticationMethod
    ) {
        Counted::Auth
    } else {
        Counted::Protocol
    };
    refuse_as(broker, wbuf, c, max_out, reason, counted, origin, why)
}

/// Which `reason` label of the refusal counters a refused CONNECT goes under.
enum Counted {
    /// The credentials were refused: `not_authorized` (listener: `auth`).
    Auth,
    /// The authentication chain could not decide (0x88): `auth_unavailable`, so an outage
    /// of the auth service is not mistaken for refused credentials, nor for the cluster's
    /// 0x88 (counted under `protocol`).
    AuthUnavailable,
    /// Any other refusal: `protocol`.
    Protocol,
}

/// [`refuse`], counted under `counted`.
#[allow(clippy::too_many_arguments)]
fn refuse_as(
    broker: &Broker,
    wbuf: &mut BytesMut,
    c: &Connect,
    max_out: usize,
    reason: ReasonCode,
    counted: Counted,
    origin: Origin,
    why: &str,
) -> Option<Client> {
    let peer = origin.peer;
    let version = c.version;
    let props = Properties::default();
    if connack_size(version, &props) <= max_out {
        encode_connack(wbuf, version, false, reason, &props);
        broker.metrics.packets_sent.add(kind::CONNACK, 1);
    }
    match counted {
        Counted::Auth => {
            broker.metrics.refused_auth.inc();
            broker.metrics.listener_refused(origin.listener, "auth");
        }
        Counted::AuthUnavailable => {
            broker.metrics.refused_auth_unavailable.inc();
            broker
                .metrics
                .listener_refused(origin.listener, "auth_unavailable");
        }
        Counted::Protocol => {
            broker.metrics.refused_protocol.inc();
            broker.metrics.listener_refused(origin.listener, "protocol");
        }
    }
    // Who was refused, as an operator greps for it (the same fields as "client connected").
    tracing::info!(
        %peer,
        listener = origin.listener,
        client_id = %c.client_id.as_str(),
        username = %c.username.as_ref().map_or("", |u| u.as_str()),
        version = version.label(),
        keep_alive = c.keep_alive,
        clean_start = c.clean_start,
        reason = reason.as_u8(),
        "connection refused: {why}"
    );
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

/// Makes a success CONNACK fit the client's Maximum Packet Size `max` ([MQTT-3.1.2-24]) by
/// leaving out, in this order, what the client can do without:
///
/// 1. Reason String and User Properties (never set today; [MQTT-3.2.2-19], [MQTT-3.2.2-20]);
/// 2. Response Information (the server may always leave it out);
/// 3. properties that only restate their default (Wildcard Subscription, Subscription
///    Identifier and Shared Subscription Available = 1, Retain Available = 1);
/// 4. Topic Alias Maximum: without it the client may use no aliases (the caller then accepts
///    none either).
///
/// What changes how the client must behave (Receive Maximum, Maximum Packet Size, Maximum QoS,
/// Retain Available = 0, Session Expiry Interval, Server Keep Alive, Assigned Client
/// Identifier) is never dropped: returns false when the CONNACK does not fit without it, and
/// the connection is then closed without a CONNACK.
fn fit_connack(props: &mut Properties, max: usize) -> bool {
    let fits = |p: &Properties| connack_size(ProtocolVersion::V5, p) <= max;
    let drops: [fn(&mut Properties); 8] = [
        |p| p.reason_string = None,
        |p| p.user_properties.clear(),
        |p| p.response_information = None,
        |p| {
            p.wildcard_subscription_available =
                p.wildcard_subscription_available.filter(|&v| v != 1)
        },
        |p| {
            p.subscription_identifier_available =
                p.subscription_identifier_available.filter(|&v| v != 1)
        },
        |p| p.shared_subscription_available = p.shared_subscription_available.filter(|&v| v != 1),
        |p| p.retain_available = p.retain_available.filter(|&v| v != 1),
        |p| p.topic_alias_maximum = None,
    ];
    for drop in drops {
        if fits(props) {
            return true;
        }
        drop(props);
    }
    fits(props)
}

/// Handles CONNECT. On success the CONNACK (and any re-sent in-flight messages) are in `wbuf`
/// and the session is attached; on refusal `wbuf` holds the refusing CONNACK.
pub(super) async fn accept(
    broker: &Arc<Broker>,
    wbuf: &mut BytesMut,
    packet: Packet,
    origin: Origin,
    kick: oneshot::Sender<Kick>,
    identity: Option<String>,
    entry: Arc<Entry>,
) -> Option<Client> {
    let Packet::Connect(c) = packet else {
        return None;
    };
    let peer = origin.peer;
    broker.metrics.packets_received.add(kind::CONNECT, 1);
    let mut c = *c;
    let limits = entry.limits.clone();
    let version = c.version;
    let v5 = version.is_v5();
    // The client's Maximum Packet Size: nothing larger may be sent to it ([MQTT-3.1.2-24]).
    let max_out = c
        .properties
        .maximum_packet_size
        .map_or(usize::MAX, |m| m as usize);

    if v5 && c.properties.authentication_method.is_some() {
        // No enhanced authentication methods are supported.
        return refuse(
            broker,
            wbuf,
            &c,
            max_out,
            ReasonCode::BadAuthenticationMethod,
            origin,
            "unsupported authentication method",
        );
    }
    // The client id first (assigned when the client sent none): authentication and the ACL
    // know the client by it (`%c`).
    let conn_id = broker.next_connection_id();
    let mut assigned = None;
    let client_id: Arc<str> = if c.client_id.is_empty() {
        let invalid = if version == ProtocolVersion::V3_1 {
            // MQTT 3.1 §3.1: the Client Identifier must be 1 to 23 characters; 3.1 has no
            // server-assigned identifiers. (Longer ones are accepted, as 3.1.1 allows.)
            Some("empty client id from an MQTT 3.1 client")
        } else if !v5 && !c.clean_start {
            // [MQTT-3.1.3-8]
            Some("empty client id with a persistent session")
        } else {
            None
        };
        if let Some(why) = invalid {
            let reason = ReasonCode::ClientIdentifierNotValid;
            return refuse(broker, wbuf, &c, max_out, reason, origin, why);
        }
        let id = assign_client_id(conn_id);
        assigned = Some(id.clone());
        Arc::from(id)
    } else {
        Arc::from(c.client_id.as_str())
    };

    // A certificate-authenticated identity replaces whatever username the client sent; else
    // the listener's chain decides, and may name the user itself (a token's claim).
    let mut username: Option<Arc<str>> = match &identity {
        Some(cn) => Some(Arc::from(cn.as_str())),
        None => c.username.as_ref().map(|u| Arc::from(u.as_str())),
    };
    let mut extras = Extras {
        mount: entry.mount.clone(),
        ..Extras::default()
    };
    if identity.is_none() {
        let creds = Credentials {
            client_id: &client_id,
            username: c.username.as_ref().map(|u| u.as_str()),
            password: c.password.as_deref(),
            listener: entry.name,
            peer,
            protocol: version.level(),
        };
        let decided = broker
            .auth
            .authenticate(&entry.chain, entry.allow_anonymous, &creds)
            .await;
        match decided {
            Ok(grant) => {
                if let Some(u) = grant.username {
                    username = Some(u);
                }
                extras.claims = grant.rules;
                extras.expires_at = grant.expires_at.map(|at| {
                    let left = at
                        .duration_since(std::time::SystemTime::now())
                        .unwrap_or_default();
                    crate::clock::now() + left
                });
            }
            Err(denial) => {
                let (reason, counted, why) = match denial {
                    Denial::NotAuthorized => (
                        ReasonCode::NotAuthorized,
                        Counted::Auth,
                        "not authorised (anonymous, or refused by the listener's authentication chain)",
                    ),
                    Denial::BadCredentials => (
                        ReasonCode::BadUserNameOrPassword,
                        Counted::Auth,
                        "bad user name or password",
                    ),
                    Denial::Unavailable => (
                        ReasonCode::ServerUnavailable,
                        Counted::AuthUnavailable,
                        "no decision from the authentication chain (auth.http did not answer, or the JWKS cannot be fetched)",
                    ),
                };
                // An outage of the auth service is no authentication failure: nobody judged
                // the credentials.
                if !matches!(counted, Counted::AuthUnavailable) {
                    broker.metrics.auth_failures.inc();
                }
                return refuse_as(broker, wbuf, &c, max_out, reason, counted, origin, why);
            }
        }
    }
    if let (Some(w), Some(mount)) = (c.will.as_mut(), &entry.mount) {
        // The will is published like any of this client's messages: under its mount point
        // (as a PUBLISH's, a `$` topic is not mounted: it is refused below).
        if !w.topic.as_str().starts_with('$') {
            w.topic = MqttStr::from(format!("{mount}{}", w.topic.as_str()));
        }
    }
    if identity.is_none() && entry.chain.contains(&crate::config::Backend::Http) {
        // On a listener whose chain names the HTTP service, the service decides every
        // client's topics too (`asking.rs`), whichever backend let the client in.
        if let Some(http) = broker.auth.http_acl() {
            if let Some(w) = &c.will {
                let allowed = http
                    .authorize(
                        &client_id,
                        username.as_deref(),
                        entry.name,
                        peer,
                        crate::auth::http::Action::Publish,
                        w.topic.as_str(),
                    )
                    .await;
                if !allowed {
                    return refuse(
                        broker,
                        wbuf,
                        &c,
                        max_out,
                        ReasonCode::NotAuthorized,
                        origin,
                        "will topic not authorised by the HTTP service",
                    );
                }
            }
            extras.asking = Some(Box::new(super::asking::Asking::new(http, entry.name, peer)));
        }
    }

    if let Some(w) = &c.will {
        let cid: &str = &client_id;
        let topic = w.topic.as_str();
        if !limits.topic_within(topic) {
            return refuse(
                broker,
                wbuf,
                &c,
                max_out,
                ReasonCode::TopicNameInvalid,
                origin,
                "will topic over limits.max_topic_length or limits.max_topic_levels",
            );
        }
        if !broker
            .auth
            .can_publish(username.as_deref(), cid, w.topic.as_str())
            || !extras.may_publish(w.topic.as_str())
        {
            return refuse(
                broker,
                wbuf,
                &c,
                max_out,
                ReasonCode::NotAuthorized,
                origin,
                "will topic not authorised",
            );
        }
    }
    let requested_expiry = if v5 {
        c.properties.session_expiry_interval.unwrap_or(0)
    } else if c.clean_start {
        0
    } else {
        u32::MAX
    };
    let session_expiry = requested_expiry.min(limits.max_session_expiry_secs());
    if session_expiry > 0 && broker.peers().is_some_and(|p| !p.available()) {
        // A persistent session is a durable promise the cluster cannot make without its
        // store's quorum (3.1.1: return code 3, Server unavailable).
        return refuse(
            broker,
            wbuf,
            &c,
            max_out,
            ReasonCode::ServerUnavailable,
            origin,
            "cluster without quorum: persistent session refused",
        );
    }

    let mut keep_alive = c.keep_alive;
    let mut server_keep_alive = None;
    let max_keepalive = limits.max_keepalive_secs();
    if v5 && max_keepalive != 0 && (keep_alive == 0 || keep_alive > max_keepalive) {
        keep_alive = max_keepalive;
        server_keep_alive = Some(keep_alive);
    }

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
    if v5 && !fit_connack(&mut props, max_out) {
        // [MQTT-3.1.2-24] even the CONNACK without its optional properties is larger than the
        // client accepts: close without one (before attaching, so no session is touched).
        broker.metrics.refused_protocol.inc();
        tracing::info!(
            %peer,
            max_packet_size = max_out,
            "connection refused: CONNACK larger than the client's Maximum Packet Size, not sent"
        );
        return None;
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
                &c,
                max_out,
                ReasonCode::ServerBusy,
                origin,
                &e.to_string(),
            );
        }
    };
    broker.registry.set_conn_info(
        &client_id,
        conn_id,
        crate::session::registry::ConnInfo {
            peer,
            protocol: version.label(),
            listener: origin.listener,
            keep_alive,
            since_ms: crate::storage::record::unix_now_ms(),
        },
    );
    let mut session_present = attached.existed && !c.clean_start;
    let stored_before = attached
        .handle
        .persistent
        .load(std::sync::atomic::Ordering::Relaxed);
    if !session_present {
        // [MQTT-3.1.2-4] a clean start discards the previous session; so does a session that
        // ended with its previous connection.
        broker.end_session(&attached.handle, &mut attached.state);
    }
    attached
        .handle
        .set_subscriptions(attached.state.subscription_records());
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
    if let Some(peers) = broker.peers() {
        if !session_present && !c.clean_start && session_expiry > 0 {
            // The client's session may be on another node of the cluster: it moves here,
            // stored before the CONNACK that says so (`cluster/sessions.rs`).
            if let Some(commit) = peers
                .take_session(&client_id, &attached.handle, &mut attached.state)
                .await
            {
                session_present = true;
                connack_commit = Some(commit);
            }
        }
        // The client id is this node's now: a connection holding it on another node is
        // taken over ([MQTT-3.1.4-3] across the cluster).
        if session_expiry > 0 && !session_present {
            // A new persistent session is found by the other nodes even before it subscribes
            // (`cluster/anchors.rs`); nothing was routed to it before now.
            let _ = peers.store_subscriptions(
                &client_id,
                Vec::new(),
                Some(peers.position()),
                crate::storage::Commit::Done,
            );
        }
        let claimed = peers.claim(&client_id, conn_id);
        connack_commit = Some(match connack_commit.take() {
            Some(c) => crate::storage::Commit::both(c, claimed),
            None => claimed,
        });
        if let Some(w) = &c.will {
            // Published by another node should this one die with the connection open (this
            // copy also replaces a delayed will the client left).
            let stored = peers.store_will(&client_id, conn_id, w);
            connack_commit = Some(match connack_commit.take() {
                Some(c) => crate::storage::Commit::both(c, stored),
                None => stored,
            });
        } else {
            peers.will_cancelled(&client_id);
        }
    }
    attached.handle.set_username(username.clone());
    attached.handle.outbox.set_online(true);

    let connack_at = wbuf.len();
    encode_connack(wbuf, version, session_present, ReasonCode::Success, &props);
    broker.metrics.packets_sent.add(kind::CONNACK, 1);
    broker.metrics.connections_total.inc();

    let window = usize::from(limits.max_inflight).min(usize::from(
        c.properties.receive_maximum.unwrap_or(u16::MAX),
    ));
    let max_packet_out = max_out;
    let aliases = if v5 {
        // What CONNACK announced (none when it had to be left out to fit).
        TopicAliases::new(
            props.topic_alias_maximum.unwrap_or(0),
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
        c.will.map(Box::new),
        window,
        max_packet_out,
        aliases,
        limits,
    );
    client.username = username;
    client.acl_mode = entry.acl_mode;
    if !extras.is_empty() {
        client.extras = Some(Box::new(extras));
    }
    client.gate.hold_commit(connack_at, connack_commit);
    if session_present {
        client.attach_groups();
        client.resend_inflight(wbuf);
    }
    Some(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Tern's CONNACK carries with the default configuration.
    fn full() -> Properties {
        Properties {
            receive_maximum: Some(1024),
            retain_available: Some(1),
            maximum_packet_size: Some(1_048_576),
            topic_alias_maximum: Some(64),
            wildcard_subscription_available: Some(1),
            subscription_identifier_available: Some(1),
            shared_subscription_available: Some(1),
            response_information: Some(MqttStr::from("reply/a-client")),
            ..Properties::default()
        }
    }

    fn size(p: &Properties) -> usize {
        connack_size(ProtocolVersion::V5, p)
    }

    #[test]
    fn a_connack_that_fits_is_left_alone() {
        let mut p = full();
        assert!(fit_connack(&mut p, size(&full())));
        assert_eq!(p, full());
        assert!(fit_connack(&mut p, usize::MAX));
        assert_eq!(p, full());
    }

    #[test]
    fn optional_properties_go_first_in_order() {
        // One byte short: Response Information goes, nothing else.
        let mut p = full();
        assert!(fit_connack(&mut p, size(&full()) - 1));
        assert_eq!(p.response_information, None);
        assert_eq!(
            Properties {
                response_information: None,
                ..full()
            },
            p
        );
        // Then the properties that restate their defaults, Topic Alias Maximum last.
        let essential = Properties {
            receive_maximum: Some(1024),
            maximum_packet_size: Some(1_048_576),
            ..Properties::default()
        };
        let mut p = full();
        let with_aliases = Properties {
            topic_alias_maximum: Some(64),
            ..essential.clone()
        };
        assert!(fit_connack(&mut p, size(&with_aliases)));
        assert_eq!(p, with_aliases);
        let mut p = full();
        assert!(fit_connack(&mut p, size(&essential)));
        assert_eq!(p, essential);
    }

    #[test]
    fn reason_string_and_user_properties_are_dropped_before_anything_else() {
        let mut p = Properties {
            reason_string: Some(MqttStr::from("why")),
            user_properties: vec![(MqttStr::from("k"), MqttStr::from("v"))],
            ..full()
        };
        assert!(fit_connack(&mut p, size(&full())));
        assert_eq!(p, full());
    }

    #[test]
    fn what_the_client_must_know_is_never_dropped() {
        let essential = Properties {
            receive_maximum: Some(10),
            maximum_packet_size: Some(1024),
            maximum_qos: Some(1),
            retain_available: Some(0),
            session_expiry_interval: Some(60),
            server_keep_alive: Some(30),
            assigned_client_identifier: Some(MqttStr::from("tern-1-2")),
            ..Properties::default()
        };
        let mut p = Properties {
            wildcard_subscription_available: Some(1),
            topic_alias_maximum: Some(64),
            ..essential.clone()
        };
        assert!(fit_connack(&mut p, size(&essential)));
        assert_eq!(
            p, essential,
            "Retain Available = 0 stays: it is not the default"
        );
        let mut p = essential.clone();
        assert!(!fit_connack(&mut p, size(&essential) - 1));
        assert_eq!(p, essential, "nothing essential was dropped trying");
    }
}
