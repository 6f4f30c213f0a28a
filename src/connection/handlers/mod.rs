//! What a connected client's packets do: `handle_<packet>` for inbound, `send_<packet>` for
//! outbound. Everything here writes into the connection's write buffer and calls the broker;
//! no socket I/O happens in this file.

mod acks;
mod publish;

use super::client::Client;
use super::responses::Response;
use super::Close;
use crate::error::ProtocolError;
use crate::outbox::{Delivery, SubIds};
use crate::protocol::*;
use crate::session::Subscription;
use crate::storage::record::SubscriptionRecord;
use crate::storage::{Commit, Op};
use bytes::BytesMut;

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
            Packet::PubAck(a) => self.handle_puback(a),
            Packet::PubRec(a) => self.handle_pubrec(a, wbuf),
            Packet::PubRel(a) => {
                self.handle_pubrel(a, wbuf);
                Ok(())
            }
            Packet::PubComp(a) => self.handle_pubcomp(a),
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
