//! What a connected client's packets do: `handle_<packet>` for inbound, `send_<packet>` for
//! outbound. Everything here writes into the connection's write buffer and calls the broker;
//! no socket I/O happens in this file.

use super::pending::{AckQueue, Gate, OpsCommit, PendingAck, Response};
use super::{Close, TokenBucket};
use crate::broker::shared::Group;
use crate::broker::{Broker, Staged, Subscriber};
use crate::config::Limits;
use crate::error::ProtocolError;
use crate::message::Message;
use crate::outbox::{Delivery, SubIds};
use crate::protocol::*;
use crate::session::registry::{Detached, SessionHandle};
use crate::session::{Outbound, PubRecAction, SessionState, Subscription, TopicAliases, WrongAck};
use crate::storage::record::{
    unix_now_ms, InflightRecord, QueueEntry, SessionRecord, SubscriptionRecord, WillRecord,
};
use crate::storage::{Commit, Op};
use bytes::BytesMut;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OwnedMutexGuard;

/// A connected client: protocol state of this connection plus the attached session.
pub(crate) struct Client {
    pub broker: Arc<Broker>,
    pub version: ProtocolVersion,
    pub client_id: Arc<str>,
    /// The authenticated username (or the TLS certificate identity), for authorisation.
    pub username: Option<Arc<str>>,
    pub clean_start: bool,
    pub conn_id: u64,
    pub handle: Arc<SessionHandle>,
    pub state: OwnedMutexGuard<SessionState>,
    /// Keep Alive in effect, seconds (0: none).
    pub keep_alive: u16,
    /// Session Expiry Interval in effect, seconds (`u32::MAX`: never).
    pub session_expiry: u32,
    /// The Session Expiry Interval the client sent in CONNECT (0 forbids raising it later).
    pub connect_expiry: u32,
    pub will: Option<Will>,
    /// Outbound window: min(limits.max_inflight, client's Receive Maximum).
    pub window: usize,
    /// Client's Maximum Packet Size.
    pub max_packet_out: usize,
    pub aliases: TopicAliases,
    pub acks: AckQueue,
    pub(super) scratch: Vec<Subscriber>,
    pub(super) batch: Vec<Delivery>,
    /// Per-connection tallies, added to the shared counters once per read or write batch
    /// rather than once per message (shared atomics are contended across cores).
    pub(super) tally: Tally,
    /// Durable bookkeeping of outbound messages, submitted once per batch.
    pub(super) pending_ops: Vec<Op>,
    /// Whether the last input routed a message to someone.
    pub(super) routed: bool,
    /// The last submit of `pending_ops`: delivering waits for it, so a subscriber draining a
    /// stored queue goes at the store's pace instead of piling work up in front of it.
    pub ops_commit: OpsCommit,
    pub gate: Gate,
    /// `limits.max_publish_rate` / `limits.max_publish_bytes_rate` budgets (None: no limit).
    pub(super) publish_rate: Option<TokenBucket>,
    pub(super) publish_bytes_rate: Option<TokenBucket>,
    /// Shared subscription groups this session is a member of (their lanes are drained with
    /// the outbox).
    pub(super) groups: Vec<Arc<Group>>,
    /// A queue this client's last publish filled past the back-pressure threshold: reading
    /// pauses until it has drained to half.
    pub(super) pressure: Option<Arc<SessionHandle>>,
    /// Complete packets were left in the read buffer by a pause: handle them when it ends,
    /// whether or not the client sends anything more.
    pub held_input: bool,
    /// The limits this connection was accepted with: its CONNACK announced them, so a reload
    /// applies to later connections only.
    pub(super) limits: Arc<Limits>,
    /// The time as the driver last told it (see `core.rs`): handlers never read a clock.
    pub(super) now: Instant,
    /// When the client last sent something (keep alive) and when we last wrote (write stall).
    pub(super) last_read: Instant,
    pub(super) last_write: Instant,
}

/// Whether a queued acknowledgement stands for a PUBLISH the Receive Maximum counts while it
/// waits. An accepted QoS 2 PUBLISH is counted once, by its packet id in `inbound_qos2` (from
/// PUBLISH to PUBREL), not a second time while its PUBREC waits for a commit.
fn counts_against_receive_maximum(ack: &Response) -> bool {
    match ack {
        Response::PubAck(..) => true,
        Response::PubRec(_, reason) => reason.is_failure(),
        _ => false,
    }
}

/// An acknowledgement of the wrong kind for its message (PUBCOMP for QoS 1, PUBACK for QoS 2,
/// ...) is a protocol error: v5 DISCONNECT 0x82, 3.x close.
fn wrong_ack(e: WrongAck) -> Close {
    Close::Protocol(ProtocolError::Protocol(e.0))
}

/// How often a publisher paused by back-pressure looks at the queue again.
const BACKPRESSURE_POLL: Duration = Duration::from_millis(5);

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

#[derive(Default)]
pub(super) struct Tally {
    pub(super) received: [u64; 3],
    pub(super) sent: [u64; 3],
    pub(super) bytes_received: u64,
    /// Control packets by type nibble, received and sent.
    pub(super) packets_in: [u32; 16],
    pub(super) packets_out: [u32; 16],
}

impl Client {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        broker: Arc<Broker>,
        version: ProtocolVersion,
        client_id: Arc<str>,
        clean_start: bool,
        conn_id: u64,
        handle: Arc<SessionHandle>,
        state: OwnedMutexGuard<SessionState>,
        keep_alive: u16,
        session_expiry: u32,
        connect_expiry: u32,
        will: Option<Will>,
        window: usize,
        max_packet_out: usize,
        aliases: TopicAliases,
        limits: Arc<Limits>,
    ) -> Client {
        let now = crate::clock::now();
        let rates = (limits.max_publish_rate, limits.max_publish_bytes_rate);
        let bucket = |rate: u32| (rate > 0).then(|| TokenBucket::new(f64::from(rate), now));
        Client {
            broker,
            version,
            client_id,
            username: None,
            clean_start,
            conn_id,
            handle,
            state,
            keep_alive,
            session_expiry,
            connect_expiry,
            will,
            window,
            max_packet_out,
            aliases,
            acks: AckQueue::default(),
            scratch: Vec::new(),
            batch: Vec::new(),
            tally: Tally::default(),
            pending_ops: Vec::new(),
            routed: false,
            ops_commit: OpsCommit::default(),
            gate: Gate::default(),
            publish_rate: bucket(rates.0),
            publish_bytes_rate: bucket(rates.1),
            groups: Vec::new(),
            pressure: None,
            held_input: false,
            limits,
            now,
            last_read: now,
            last_write: now,
        }
    }

    /// How long until this client's publish budget allows reading on (None: it does now).
    pub fn throttle_wait(&mut self) -> Option<Duration> {
        if let Some(queue) = &self.pressure {
            // Back-pressure: wait while the queue is above half and someone drains it (a queue
            // nobody is connected to would never drain: then its limit drops messages instead).
            if queue.outbox.drained_and_above(1, 2) {
                return Some(BACKPRESSURE_POLL);
            }
            self.pressure = None;
        }
        if self.publish_rate.is_none() && self.publish_bytes_rate.is_none() {
            return None;
        }
        let now = self.now;
        let a = self.publish_rate.as_mut().and_then(|b| b.wait(now));
        let b = self.publish_bytes_rate.as_mut().and_then(|b| b.wait(now));
        a.max(b)
    }

    /// Charges one PUBLISH of `size` bytes to the publish budgets.
    fn charge_publish(&mut self, size: usize) {
        let now = self.now;
        if let Some(b) = self.publish_rate.as_mut() {
            b.take(1.0, now);
        }
        if let Some(b) = self.publish_bytes_rate.as_mut() {
            b.take(size as f64, now);
        }
    }

    /// The keep alive deadline after the last packet: 1.5 times Keep Alive ([MQTT-3.1.2-24]).
    pub fn keep_alive_limit(&self) -> Option<tokio::time::Duration> {
        (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500))
    }

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

    /// Whether input since the last call routed a message to a subscriber.
    pub fn take_routed(&mut self) -> bool {
        std::mem::take(&mut self.routed)
    }

    /// Whether this session's state goes to the durable store.
    pub(super) fn stores_session(&self) -> bool {
        self.broker.store.durable()
            && self
                .handle
                .persistent
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) fn stage_inflight_done(&mut self, packet_id: u16) {
        if self.stores_session() {
            self.pending_ops.push(Op::DeleteInflight {
                session_id: self.handle.id,
                packet_id,
            });
        }
    }

    /// Submits what the subscriber side staged (in-flight bookkeeping). Nothing is
    /// acknowledged on its strength, so nobody waits; the storage thread keeps the order.
    pub fn flush_ops(&mut self) {
        if !self.pending_ops.is_empty() {
            let ops = std::mem::take(&mut self.pending_ops);
            if let Commit::Pending(rx) = self.broker.store.submit(ops) {
                // The store commits in submission order: the newest receiver covers the rest.
                if self.gate.needs_submit {
                    self.gate.needs_submit = false;
                    self.gate.commit = Some(rx);
                } else {
                    self.ops_commit.push(rx);
                }
            }
        }
    }

    /// Sends `ack` now when nothing is ahead of it and its commit is done (the common case
    /// with the in-memory store), else queues it behind the others.
    fn queue_ack(
        &mut self,
        commit: Commit,
        ack: Response,
        retained: Vec<Delivery>,
        wbuf: &mut BytesMut,
    ) {
        if counts_against_receive_maximum(&ack) {
            self.acks.unacked_publishes += 1;
        }
        if self.acks.queue.is_empty() && matches!(commit, Commit::Done) {
            self.send_ack(&ack, wbuf);
            self.queue_retained(retained);
        } else {
            self.acks.queue.push_back(PendingAck {
                commit,
                ack,
                retained,
            });
        }
    }

    /// Retained messages for a subscription this client just made, after its SUBACK.
    fn queue_retained(&self, retained: Vec<Delivery>) {
        for d in retained {
            self.broker.push(&self.handle, d);
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
            self.session_expiry = expiry.min(self.limits.max_session_expiry_secs());
        }
        if d.reason == ReasonCode::DisconnectWithWill.as_u8() {
            Close::NormalWithWill
        } else {
            Close::Normal
        }
    }

    /// Moves acknowledgements whose commits are done into the write buffer, in order.
    pub fn release_acks(&mut self, wbuf: &mut BytesMut) -> Result<(), Close> {
        while let Some(front) = self.acks.queue.front_mut() {
            let failed = match &mut front.commit {
                Commit::Done => false,
                Commit::Failed => true,
                Commit::Pending(rx) => match rx.try_recv() {
                    Ok(()) => false,
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return Ok(()),
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed) => true,
                },
            };
            if failed {
                // The store failed: never acknowledge what it did not keep.
                return Err(Close::StorageFailed);
            }
            let Some(p) = self.acks.queue.pop_front() else {
                break;
            };
            self.send_ack(&p.ack, wbuf);
            self.queue_retained(p.retained);
        }
        Ok(())
    }

    fn send_ack(&mut self, ack: &Response, wbuf: &mut BytesMut) {
        let v = self.version;
        let k = match ack {
            Response::PubAck(..) => kind::PUBACK,
            Response::PubRec(..) => kind::PUBREC,
            Response::PubComp(..) => kind::PUBCOMP,
            Response::SubAck(..) => kind::SUBACK,
            Response::UnsubAck(..) => kind::UNSUBACK,
        };
        self.tally.packets_out[usize::from(k)] += 1;
        match ack {
            Response::PubAck(id, r) => {
                self.acks.unacked_publishes -= 1;
                encode_pub_response(wbuf, v, PUBACK, *id, r.as_u8())
            }
            Response::PubRec(id, r) => {
                if counts_against_receive_maximum(ack) {
                    self.acks.unacked_publishes -= 1;
                }
                encode_pub_response(wbuf, v, PUBREC, *id, r.as_u8())
            }
            Response::PubComp(id, r) => encode_pub_response(wbuf, v, PUBCOMP, *id, r.as_u8()),
            Response::SubAck(id, codes) => {
                let raw: Vec<u8> = codes.iter().map(|c| c.as_u8()).collect();
                encode_suback(wbuf, v, *id, &raw)
            }
            Response::UnsubAck(id, codes) => {
                let raw: Vec<u8> = codes.iter().map(|c| c.as_u8()).collect();
                encode_unsuback(wbuf, v, *id, &raw)
            }
        }
    }

    /// After the connection closed: the will, then the session goes back to the registry
    /// (kept, ended, or already taken over) and, when durable, its record is updated.
    pub fn finish(mut self, publish_will: bool) {
        self.flush_ops();
        let broker = self.broker.clone();
        let mut will = self.will.take().filter(|_| publish_will);
        let delay = match &will {
            Some(w) if self.version.is_v5() => w.delay_interval.min(self.session_expiry),
            _ => 0,
        };
        if delay == 0 {
            if let Some(w) = will.take() {
                broker.publish_will(&w, self.handle.id);
            }
        }
        let mut state = self.state;
        match broker
            .registry
            .detach(&self.client_id, self.conn_id, self.session_expiry)
        {
            Detached::Ended(handle) => {
                broker.end_session(&handle, &mut state);
                if let Some(w) = will {
                    // The session ended first ([MQTT-3.1.3-9]: whichever comes first).
                    broker.publish_will(&w, self.handle.id);
                }
            }
            Detached::Kept => {
                broker.shared_member_gone(&self.handle, &mut state, false);
                let record = SessionRecord {
                    client_id: self.client_id.to_string(),
                    session_id: self.handle.id,
                    expiry_interval: self.session_expiry,
                    disconnected_at_ms: Some(unix_now_ms()),
                    will: will.as_ref().map(WillRecord::from),
                    username: self.username.as_deref().map(str::to_string),
                };
                if broker.store.durable()
                    && self
                        .handle
                        .persistent
                        .load(std::sync::atomic::Ordering::Relaxed)
                {
                    let _ = broker.store.submit(vec![Op::PutSession(record.clone())]);
                }
                if let Some(w) = will {
                    let abort = broker.spawn_delayed_will(w, delay, record);
                    broker
                        .registry
                        .set_pending_will(&self.client_id, self.handle.id, abort);
                }
            }
            // The new connection owns the session (and cancels a delayed will by arriving
            // within the delay). If this connection ended the session (expiry 0 at its close,
            // typically a DISCONNECT read while being taken over), the new one must not
            // continue it: it learns so from the state it is waiting for.
            Detached::TakenOver => {
                if self.session_expiry == 0 {
                    state.ended = true;
                }
            }
        }
    }
}
