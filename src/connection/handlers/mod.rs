//! What a connected client's packets do: `handle_<packet>` for inbound, `send_<packet>` for
//! outbound. Everything here writes into the connection's write buffer and calls the broker;
//! no socket I/O happens in this file.

use super::client::Client;
use super::responses::Response;
use super::Close;
use crate::broker::Staged;
use crate::error::ProtocolError;
use crate::message::Message;
use crate::outbox::{Delivery, SubIds};
use crate::protocol::*;
use crate::session::{Outbound, PubRecAction, Subscription, WrongAck};
use crate::storage::record::{InflightRecord, QueueEntry, SubscriptionRecord};
use crate::storage::{Commit, Op};
use bytes::BytesMut;
use std::sync::Arc;

/// An acknowledgement of the wrong kind for its message (PUBCOMP for QoS 1, PUBACK for QoS 2,
/// ...) is a protocol error: v5 DISCONNECT 0x82, 3.x close.
fn wrong_ack(e: WrongAck) -> Close {
    Close::Protocol(ProtocolError::Protocol(e.0))
}

/// The durable record of an in-flight delivery.
pub(super) fn inflight_record(packet_id: u16, d: &Delivery, released: bool) -> InflightRecord {
    InflightRecord {
        packet_id,
        order: d.order,
        entry: QueueEntry {
            msg_id: d.msg.id,
            qos: d.qos,
            retain: d.retain,
            sub_ids: d.sub_ids.as_slice().to_vec(),
        },
        released,
        group: d.group.as_ref().map(|g| g.queue.id),
    }
}

impl Client {
    /// Decodes and handles every complete packet in `rbuf`.
    pub fn process_input(&mut self, rbuf: &mut BytesMut, wbuf: &mut BytesMut) -> Result<(), Close> {
        let max = self.limits.max_packet_size as usize;
        loop {
            if self.throttle_wait().is_some() {
                // Publish budget spent (or back-pressure): the rest stays in `rbuf` until the
                // pause ends; the connection loop comes back for it.
                self.held_input = true;
                self.flush_tally();
                return Ok(());
            }
            self.held_input = false;
            match decode_packet(rbuf, Some(self.version), max) {
                Ok(DecodeOutcome::Packet(packet, size)) => {
                    self.tally.bytes_received += size as u64;
                    if let Packet::Publish(_) = &packet {
                        self.charge_publish(size);
                    }
                    if let Err(close) = self.handle_packet(packet, wbuf) {
                        self.flush_tally();
                        return Err(close);
                    }
                }
                Ok(DecodeOutcome::Incomplete(need)) => {
                    if let Some(total) = need {
                        rbuf.reserve(total.saturating_sub(rbuf.len()));
                    }
                    self.flush_tally();
                    return Ok(());
                }
                Err(e) => {
                    self.flush_tally();
                    return Err(Close::Protocol(e));
                }
            }
        }
    }

    fn handle_packet(&mut self, packet: Packet, wbuf: &mut BytesMut) -> Result<(), Close> {
        self.tally.packets_in[usize::from(packet.kind())] += 1;
        match packet {
            Packet::Publish(p) => self.handle_publish(p, wbuf).map_err(Close::Protocol),
            Packet::PubAck(a) => {
                // An id not in flight is a late or repeated PUBACK: nothing to do.
                if let Some(d) = self
                    .state
                    .inflight
                    .on_puback(a.packet_id)
                    .map_err(wrong_ack)?
                {
                    self.stage_inflight_done(a.packet_id);
                    self.group_delivery_done(&d, true, true);
                }
                Ok(())
            }
            Packet::PubRec(a) => self.handle_pubrec(a, wbuf),
            Packet::PubRel(a) => {
                self.handle_pubrel(a, wbuf);
                Ok(())
            }
            Packet::PubComp(a) => {
                // An id not in flight is a late or repeated PUBCOMP: nothing to do.
                if let Some(d) = self
                    .state
                    .inflight
                    .on_pubcomp(a.packet_id)
                    .map_err(wrong_ack)?
                {
                    self.stage_inflight_done(a.packet_id);
                    self.group_delivery_done(&d, false, true);
                }
                Ok(())
            }
            Packet::Subscribe(s) => {
                if s.filters
                    .iter()
                    .any(|(f, o)| o.no_local && validate::shared_subscription(f.as_str()).is_some())
                {
                    // [MQTT-3.8.3-4]
                    return Err(Close::Protocol(ProtocolError::Protocol(
                        "No Local on a shared subscription",
                    )));
                }
                self.handle_subscribe(s, wbuf);
                Ok(())
            }
            Packet::Unsubscribe(u) => {
                self.handle_unsubscribe(u, wbuf);
                Ok(())
            }
            Packet::PingReq => {
                encode_pingresp(wbuf);
                self.tally.packets_out[usize::from(kind::PINGRESP)] += 1;
                Ok(())
            }
            Packet::Disconnect(d) => Err(self.handle_disconnect(d)),
            Packet::Auth(_) => Err(Close::Protocol(ProtocolError::Protocol(
                "AUTH without an authentication method",
            ))),
            Packet::Connect(_) => Err(Close::Protocol(ProtocolError::Protocol("second CONNECT"))),
        }
    }

    pub(super) fn stage_inflight_done(&mut self, packet_id: u16) {
        if self.stores_session() {
            self.pending_ops.push(Op::DeleteInflight {
                session_id: self.handle.id,
                packet_id,
            });
        }
    }

    fn handle_publish(&mut self, p: Publish, wbuf: &mut BytesMut) -> Result<(), ProtocolError> {
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
        if !self.topic_within_limits(topic.as_str()) {
            // limits.max_topic_length / max_topic_levels (v5: DISCONNECT 0x90).
            return Err(ProtocolError::TopicNameInvalid);
        }
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
                });
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
                    broker.commit_detached(staged);
                    return Ok(());
                }
                if p.qos == QoS::ExactlyOnce {
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
                let reason = if v5 && routed.matched == 0 {
                    ReasonCode::NoMatchingSubscribers
                } else {
                    ReasonCode::Success
                };
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

    fn handle_pubrec(&mut self, a: PubResponse, wbuf: &mut BytesMut) -> Result<(), Close> {
        // A shared subscription delivery: the group learns the outcome below.
        let group_delivery = match self.state.inflight.get(a.packet_id) {
            Some(Outbound::Published(d)) if d.group.is_some() => Some(d.clone()),
            _ => None,
        };
        // Checked before the group hears of it: a PUBREC for a QoS 1 message settles nothing.
        let action = self
            .state
            .inflight
            .on_pubrec(a.packet_id, a.reason)
            .map_err(wrong_ack)?;
        if let Some(d) = &group_delivery {
            // PUBREC (accepted or refused) settles where the message is: not back to the group.
            self.group_delivery_done(d, true, a.reason >= 0x80);
        }
        match action {
            PubRecAction::SendPubRel(reason) => {
                if reason == 0 && self.stores_session() {
                    if let Some(Outbound::Released(d)) = self
                        .state
                        .inflight
                        .get(a.packet_id)
                        .filter(|o| matches!(o, Outbound::Released(d) if d.stored))
                    {
                        let rec = inflight_record(a.packet_id, d, true);
                        self.pending_ops.push(Op::PutInflight {
                            session_id: self.handle.id,
                            rec,
                        });
                        self.gate.hold_from(wbuf.len());
                    }
                }
                self.tally.packets_out[usize::from(kind::PUBREL)] += 1;
                encode_pub_response(wbuf, self.version, PUBREL, a.packet_id, reason)
            }
            PubRecAction::Finished => self.stage_inflight_done(a.packet_id),
        }
        Ok(())
    }

    fn handle_pubrel(&mut self, a: PubResponse, wbuf: &mut BytesMut) {
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

    /// `limits.max_topic_length` and `limits.max_topic_levels` for a topic name or filter.
    pub(super) fn topic_within_limits(&self, topic: &str) -> bool {
        self.limits.topic_within(topic)
    }

    fn handle_subscribe(&mut self, s: Subscribe, wbuf: &mut BytesMut) {
        let broker = self.broker.clone();
        let max_qos = QoS::from_u8(broker.config.mqtt.max_qos).unwrap_or(QoS::ExactlyOnce);
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        let mut ops = Vec::new();
        let mut found = Vec::new();
        for (filter, mut options) in s.filters {
            let f = filter.as_str();
            let shared = crate::broker::shared::parse(f);
            if matches!(shared, Some(Err(()))) {
                codes.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            if !validate::is_valid_topic_filter(f) || !self.topic_within_limits(f) {
                codes.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            if !broker
                .auth
                .can_subscribe(self.username.as_deref(), &self.client_id, f)
            {
                codes.push(ReasonCode::NotAuthorized);
                continue;
            }
            let max_subs = self.limits.max_subscriptions;
            if max_subs > 0
                && self.state.subscriptions.len() >= max_subs
                && !self.state.subscriptions.contains_key(f)
            {
                // limits.max_subscriptions; re-subscribing to a filter it has is fine.
                codes.push(ReasonCode::QuotaExceeded);
                continue;
            }
            options.qos = options.qos.min(max_qos);
            let sub = Subscription {
                options,
                id: s.subscription_identifier,
            };
            let existed = self
                .state
                .subscriptions
                .insert(f.to_string(), sub)
                .is_some();
            match shared {
                Some(Ok((share, inner))) => {
                    self.join_group(share, inner, options, s.subscription_identifier)
                }
                _ => {
                    broker.subscribe(&self.handle, f, options, s.subscription_identifier);
                }
            }
            if self.stores_session() {
                ops.push(Op::PutSubscription {
                    client_id: self.client_id.to_string(),
                    sub: SubscriptionRecord {
                        filter: f.to_string(),
                        options,
                        id: s.subscription_identifier,
                    },
                });
            }
            codes.push(ReasonCode::granted(options.qos));
            // Retained messages: Retain Handling 0 always, 1 only for a new subscription,
            // 2 never ([MQTT-3.3.1-9] .. [MQTT-3.3.1-11]); always with RETAIN=1 ([MQTT-3.3.1-8]).
            // Never for a shared subscription (MQTT 5 §4.8.2).
            let send_retained = match options.retain_handling {
                _ if shared.is_some() => false,
                0 => true,
                1 => !existed,
                _ => false,
            };
            if send_retained && broker.config.mqtt.retain_available {
                found.clear();
                broker.retained_for(f, &mut found);
                for msg in found.drain(..) {
                    if !broker.auth.can_receive(
                        self.username.as_deref(),
                        &self.client_id,
                        msg.topic.as_str(),
                    ) {
                        continue;
                    }
                    let mut sub_ids = SubIds::None;
                    if let Some(id) = s.subscription_identifier {
                        sub_ids.push(id);
                    }
                    let qos = options.qos.min(msg.qos);
                    retained.push(Delivery::new(msg, qos, true, sub_ids));
                }
            }
        }
        // 3.x has one failure code (0x80): `encode_suback` maps every refusal to it.
        // SUBACK after the subscription is stored.
        let commit = if ops.is_empty() {
            Commit::Done
        } else {
            broker.store.submit(ops)
        };
        self.queue_ack(commit, Response::SubAck(s.packet_id, codes), retained, wbuf);
    }

    fn handle_unsubscribe(&mut self, u: Unsubscribe, wbuf: &mut BytesMut) {
        let mut codes = Vec::with_capacity(u.filters.len());
        let mut ops = Vec::new();
        for filter in u.filters {
            let f = filter.as_str();
            let removed = self.state.subscriptions.remove(f).is_some();
            if removed {
                if crate::broker::shared::parse(f).is_some() {
                    self.leave_group(f);
                } else {
                    self.broker.unsubscribe(&self.handle, f);
                }
                if self.stores_session() {
                    ops.push(Op::DeleteSubscription {
                        client_id: self.client_id.to_string(),
                        filter: f.to_string(),
                    });
                }
            }
            codes.push(if removed {
                ReasonCode::Success
            } else {
                ReasonCode::NoSubscriptionExisted
            });
        }
        let commit = if ops.is_empty() {
            Commit::Done
        } else {
            self.broker.store.submit(ops)
        };
        self.queue_ack(
            commit,
            Response::UnsubAck(u.packet_id, codes),
            Vec::new(),
            wbuf,
        );
    }

    fn handle_disconnect(&mut self, d: Disconnect) -> Close {
        if let Some(expiry) = d.session_expiry_interval {
            if self.connect_expiry == 0 && expiry != 0 {
                // [MQTT-3.14.2-2]
                return Close::Protocol(ProtocolError::Protocol(
                    "session expiry set at DISCONNECT after 0 at CONNECT",
                ));
            }
            self.session_expiry = expiry.min(self.limits.max_session_expiry);
        }
        if d.reason == ReasonCode::DisconnectWithWill.as_u8() {
            Close::NormalWithWill
        } else {
            Close::Normal
        }
    }
}
