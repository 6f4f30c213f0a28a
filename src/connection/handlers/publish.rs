//! The client as publisher: PUBLISH in, and PUBREL, the second half of its QoS 2 exchange.
//!
//! A PUBLISH is checked (topic alias, topic name, limits, Maximum QoS, Retain Available, the
//! Receive Maximum and the QoS 2 quota), authorised, routed by the broker, and at QoS 1/2
//! acknowledged through `responses.rs` behind the commit that stores it for every persistent
//! subscriber.
//! The publish rate budgets are charged before it gets here, by the dispatch (`throttle.rs`:
//! throttling is by not reading, so it belongs to the read loop, not to the handler).
//!
//! PUBREL lives here rather than with the other acknowledgements (`acks.rs`) because it
//! finishes the client's own publish: it reads and clears `inbound_qos2`, which only
//! `handle_publish` fills, while PUBACK/PUBREC/PUBCOMP settle the broker's deliveries.

use crate::broker::Staged;
use crate::connection::client::Client;
use crate::connection::responses::Response;
use crate::message::Message;
use crate::protocol::ProtocolError;
use crate::protocol::*;
use crate::storage::{Commit, Op};
use bytes::BytesMut;
use std::sync::Arc;

impl Client {
    /// An application message from the client: checked, routed, and acknowledged (QoS 1/2)
    /// once what it promises is stored.
    pub(super) fn handle_publish(
        &mut self,
        p: Publish,
        wbuf: &mut BytesMut,
    ) -> Result<(), ProtocolError> {
        let broker = self.broker.clone();
        let v5 = self.version.is_v5();
        self.tally.received[p.qos as usize] += 1;
        let topic = if v5 {
            self.aliases
                .resolve_inbound(p.topic, p.properties.topic_alias)
                .map_err(|e| match e {
                    crate::session::AliasError::Invalid => ProtocolError::TopicAliasInvalid,
                    crate::session::AliasError::Unknown => {
                        ProtocolError::Protocol("empty topic with an unknown topic alias")
                    }
                })?
        } else {
            p.topic
        };
        if topic.is_empty() {
            // [MQTT-4.7.3-1]; v5: a zero-length topic without a topic alias is a protocol error.
            return Err(ProtocolError::Protocol("empty topic name"));
        }
        if !validate::is_valid_topic_name(topic.as_str()) {
            // [MQTT-3.3.2-2] wildcards make the packet ill-formed, not merely unacceptable.
            return Err(ProtocolError::Protocol("wildcard in a topic name"));
        }
        if !self.limits.topic_within(topic.as_str()) {
            // limits.max_topic_length / max_topic_levels (v5: DISCONNECT 0x90).
            return Err(ProtocolError::TopicNameInvalid);
        }
        // Under the listener's mount point from here on: routing, the ACL and storage see the
        // topic as the broker knows it.
        let topic = match self.mounted(topic.as_str()) {
            std::borrow::Cow::Owned(t) => MqttStr::from(t),
            std::borrow::Cow::Borrowed(_) => topic,
        };
        if p.qos.as_u8() > broker.config.mqtt.max_qos {
            return Err(ProtocolError::QosNotSupported);
        }
        if p.retain && !broker.config.mqtt.retain_available {
            return Err(ProtocolError::RetainNotSupported);
        }
        if p.qos == QoS::ExactlyOnce && self.state.inbound_qos2.contains(&p.packet_id) {
            // A re-sent QoS 2 PUBLISH before PUBREL: acknowledge again, deliver nothing
            // ([MQTT-4.3.3-9]).
            self.queue_ack(
                Commit::Done,
                Response::PubRec(p.packet_id, ReasonCode::Success),
                Vec::new(),
                wbuf,
            );
            return Ok(());
        }
        if p.qos != QoS::AtMostOnce {
            let unacked = self.acks.unacked_publishes + self.state.inbound_qos2.len();
            if v5 && unacked >= usize::from(self.limits.receive_maximum) {
                // [MQTT-3.3.4-9]
                return Err(ProtocolError::ReceiveMaximumExceeded);
            }
            if p.qos == QoS::ExactlyOnce
                && self.state.inbound_qos2.len() >= self.limits.max_inbound_qos2
            {
                return Err(ProtocolError::Qos2Quota);
            }
        }
        let mut refusal = None;
        if !broker
            .auth
            .can_publish(self.username.as_deref(), &self.client_id, topic.as_str())
            || !self.may_publish(topic.as_str())
            || !self.http_allows(crate::auth::http::Action::Publish, topic.as_str())
        {
            broker.metrics.dropped_not_authorized.inc();
            refusal = Some(ReasonCode::NotAuthorized);
        } else if v5
            && p.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&p.payload).is_err()
        {
            refusal = Some(ReasonCode::PayloadFormatInvalid);
        }
        let reason = match refusal {
            // 3.1.1 has no way to refuse: acknowledge and drop.
            Some(r) if v5 => r,
            Some(_) => ReasonCode::Success,
            None => {
                let now = self.now;
                let expiry = p.properties.message_expiry_interval;
                let msg = Arc::new(Message {
                    id: broker.next_message_id(),
                    topic,
                    payload: p.payload,
                    qos: p.qos,
                    retain: p.retain,
                    properties: PublishProperties {
                        topic_alias: None,
                        ..p.properties
                    },
                    expires_at: Message::deadline_from(expiry, now),
                    origin: self.handle.id,
                    received: Some(now),
                });
                if broker.tracer.active() {
                    broker.tracer.received(&msg, &self.client_id, p.packet_id);
                }
                let mut staged = Staged::default();
                let routed = broker.publish(&msg, &mut self.scratch, &mut staged);
                self.routed |= routed.matched > 0;
                if let Some(queue) = routed.pressure {
                    if self.pressure.is_none() {
                        broker.metrics.backpressure_pauses.inc();
                    }
                    self.pressure = Some(queue);
                }
                if p.qos == QoS::AtMostOnce {
                    // Nothing is acknowledged: retained state is stored in the background.
                    let local = broker.submit_staged(staged);
                    let _ = broker.forward(&msg, local);
                    return Ok(());
                }
                // In a cluster a node cannot know that no other node has a subscriber, nor
                // whether another node's queue took it.
                let alone = broker.peers().is_none();
                let reason = if !v5 || !alone {
                    ReasonCode::Success
                } else if routed.matched == 0 {
                    ReasonCode::NoMatchingSubscribers
                } else if routed.dropped == routed.matched && !msg.retain {
                    // Every matching queue was full: taken by nobody. The publisher learns
                    // it, rather than a success for a message no one will get (3.1.1 has no
                    // way to say it: acknowledged, and counted as queue_full).
                    ReasonCode::QuotaExceeded
                } else {
                    ReasonCode::Success
                };
                if p.qos == QoS::ExactlyOnce && !reason.is_failure() {
                    self.state.inbound_qos2.insert(p.packet_id);
                    if self.stores_session() {
                        // Stored with the message, so a re-sent PUBLISH after a restart is
                        // still recognised as a duplicate.
                        staged.ops.push(Op::PutQos2 {
                            session_id: self.handle.id,
                            packet_id: p.packet_id,
                        });
                    }
                }
                // Ack after durable: the PUBACK/PUBREC waits for the commit that stores the
                // message for every persistent session (and the retained slot). The store, not
                // this connection, makes those deliveries visible when the commit is done, so
                // they happen even if this client vanishes before its acknowledgement.
                let commit = broker.submit_staged(staged);
                // In a cluster, also stored by JetStream with its replicas before the ack.
                let commit = broker.forward(&msg, commit);
                let ack = if p.qos == QoS::AtLeastOnce {
                    Response::PubAck(p.packet_id, reason)
                } else {
                    Response::PubRec(p.packet_id, reason)
                };
                self.queue_ack(commit, ack, Vec::new(), wbuf);
                return Ok(());
            }
        };
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.queue_ack(
                Commit::Done,
                Response::PubAck(p.packet_id, reason),
                Vec::new(),
                wbuf,
            ),
            QoS::ExactlyOnce => {
                // A refusal (reason >= 0x80) ends the exchange; a 3.1.1 "acknowledge and drop"
                // still expects PUBREL.
                if !reason.is_failure() {
                    self.state.inbound_qos2.insert(p.packet_id);
                }
                self.queue_ack(
                    Commit::Done,
                    Response::PubRec(p.packet_id, reason),
                    Vec::new(),
                    wbuf,
                )
            }
        }
        Ok(())
    }

    /// The client releases a QoS 2 message it published: the exchange begun by
    /// [`Client::handle_publish`] ends with PUBCOMP, behind the commit that deletes the stored
    /// packet id when the session is durable.
    pub(super) fn handle_pubrel(&mut self, a: PubResponse, wbuf: &mut BytesMut) {
        let known = self.state.inbound_qos2.remove(&a.packet_id);
        let commit = if known && self.stores_session() {
            self.broker.store.submit(vec![Op::DeleteQos2 {
                session_id: self.handle.id,
                packet_id: a.packet_id,
            }])
        } else {
            Commit::Done
        };
        let reason = if known {
            ReasonCode::Success
        } else {
            ReasonCode::PacketIdentifierNotFound
        };
        self.queue_ack(
            commit,
            Response::PubComp(a.packet_id, reason),
            Vec::new(),
            wbuf,
        );
    }
}
