//! Outbound: draining the session's outbox into the write buffer within the in-flight window,
//! loading a stored queue from disk, and re-sending in-flight messages on reconnect. The
//! durable bookkeeping of the in-flight window (its records, staged in `pending_ops`) is here
//! too, where deliveries enter it; the acknowledgement handlers (`handlers/acks.rs`) use it to
//! settle them.

use super::client::Client;
use crate::broker::early::Finished;
use crate::broker::shared::Kind;
use crate::broker::trace::Reason;
use crate::outbox::Delivery;
use crate::protocol::*;
use crate::session::{Inflight, Outbound};
use crate::storage::record::{InflightRecord, QueueEntry};
use crate::storage::Op;
use bytes::BytesMut;
use std::time::Instant;

/// The durable record of an in-flight delivery.
fn inflight_record(packet_id: u16, d: &Delivery, released: bool) -> InflightRecord {
    InflightRecord {
        packet_id,
        order: d.order,
        entry: QueueEntry {
            msg_id: d.msg.id,
            qos: d.qos,
            retain: d.retain,
            sub_ids: d.sub_ids.as_slice().to_vec(),
            enqueued: d.enqueued,
        },
        released,
        group: d.group.map(|g| g.0),
    }
}

impl Client {
    /// Whether the outbox can give us anything now (window not full).
    pub fn can_take_more(&self) -> bool {
        self.state.inflight.len() < self.window
    }

    /// Encodes queued deliveries into `wbuf` within the in-flight window, up to `high_water`.
    pub fn fill_from_outbox(&mut self, wbuf: &mut BytesMut, high_water: usize) {
        if self.ops_commit.waiting() {
            return;
        }
        let acl = self.broker.auth.has_acl();
        while wbuf.len() < high_water {
            let slots = self.window.saturating_sub(self.state.inflight.len());
            let mut batch = std::mem::take(&mut self.batch);
            self.handle.outbox.pop_batch(slots, 64, &mut batch);
            if batch.is_empty() && slots > 0 && self.load_spilled() {
                self.handle.outbox.pop_batch(slots, 64, &mut batch);
            }
            if !self.groups.is_empty() && batch.len() < 64 {
                let used = batch.iter().filter(|d| d.qos != QoS::AtMostOnce).count();
                self.take_lanes(slots.saturating_sub(used), 64, &mut batch);
            }
            if batch.is_empty() {
                self.batch = batch;
                break;
            }
            let now = self.now;
            for d in batch.drain(..) {
                if self.denied(acl, &d) {
                    self.broker.metrics.dropped_not_authorized.inc();
                    if self.broker.tracer.active() {
                        let reason = Reason::NotAuthorized;
                        self.broker.tracer.dropped_at(&d.msg, &self.handle, reason);
                    }
                    self.stage_dequeue(&d);
                    continue;
                }
                self.send_publish(d, now, wbuf);
            }
            self.batch = batch;
        }
        self.flush_tally();
        self.flush_ops();
    }

    /// Whether this connection may not read delivery `d` (`acl`: an ACL is configured, asked
    /// once per batch). With an ACL, every delivery is checked against this connection's
    /// identity: queued and stored messages were routed under an earlier one (or before a
    /// reload). A group's message is checked even without one: it was routed to the group, not
    /// to this member, so its topic's owner (another client's reply topic) is checked here.
    /// A declared queue's message is the queue's: the right to `$queue/NAME` (`topic read
    /// $queue/NAME`) is what lets a consumer have it, whatever its topic.
    fn denied(&self, acl: bool, d: &Delivery) -> bool {
        // The `sub` claim of the token this connection came with is held on every delivery
        // too: a persistent session's subscriptions may have been made under an earlier,
        // broader token.
        if let Some(g) = self.group_of(d).filter(|g| g.kind == Kind::Queue) {
            let key = g.key();
            return !self.may_receive(&key)
                || (acl
                    && !self.broker.auth.can_subscribe(
                        self.username.as_deref(),
                        &self.client_id,
                        &key,
                    ));
        }
        if !self.may_receive(d.msg.topic.as_str()) {
            return true;
        }
        (acl || d.group.is_some())
            && !self.broker.auth.can_receive(
                self.username.as_deref(),
                &self.client_id,
                d.msg.topic.as_str(),
            )
    }

    /// Moves the next committed entries of the session's on-disk queue into memory. Returns
    /// whether anything was loaded.
    fn load_spilled(&mut self) -> bool {
        let broker = self.broker.clone();
        broker.load_spilled(&self.handle, &mut self.pending_ops)
    }

    /// Encodes one delivery; QoS 1/2 enters the in-flight window.
    fn send_publish(&mut self, mut d: Delivery, now: Instant, wbuf: &mut BytesMut) {
        let metrics = &self.broker.metrics;
        let Ok(expiry) = d.msg.remaining_expiry(now) else {
            // [MQTT-3.3.2-5] expired messages are not delivered.
            metrics.dropped_expired.inc();
            if self.broker.tracer.active() {
                self.broker.tracer.expired_at(&d.msg, &self.handle);
            }
            self.stage_dequeue(&d);
            return;
        };
        let topic = self.unmounted(d.msg.topic.as_str());
        let mut out = OutgoingPublish {
            topic: topic.as_bytes(),
            qos: d.qos,
            retain: d.retain,
            dup: false,
            packet_id: 0,
            properties: &d.msg.properties,
            extras: PublishExtras {
                message_expiry_interval: expiry,
                topic_alias: None,
                subscription_identifiers: d.sub_ids.as_slice(),
            },
            payload: &d.msg.payload,
        };
        if self.version.is_v5() {
            // Measure with the full topic (the worst case) before committing to an alias.
            out.extras.topic_alias = Some(1).filter(|_| self.aliases_enabled());
            if publish_size(self.version, &out) > self.max_packet_out {
                // [MQTT-3.1.2-25] too large for this client: behave as if sent.
                metrics.dropped_too_large.inc();
                if self.broker.tracer.active() {
                    let reason = Reason::TooLarge;
                    self.broker.tracer.dropped_at(&d.msg, &self.handle, reason);
                }
                self.stage_dequeue(&d);
                return;
            }
            out.extras.topic_alias = None;
            if let Some((alias, first)) = self.aliases.outbound(topic) {
                out.extras.topic_alias = Some(alias);
                if !first {
                    out.topic = b"";
                }
            }
        }
        if d.qos != QoS::AtMostOnce {
            if d.group.is_some() && !self.stores_session() {
                // This member keeps no durable state: the group's queue keeps the entry until
                // the member acknowledges, so a crash gives the message back to the group.
                d.stored = false;
            }
            d.order = self.state.next_order;
            self.state.next_order += 1;
            let pid = self.state.inflight.insert(d.clone());
            out.packet_id = pid;
            if let Some(seq) = d.early {
                // An early delivery (`broker/early.rs`): if its stream copy has stored it
                // already, its queue entry becomes an in-flight record like any stored one's.
                if let Some(msg_id) = self.broker.early.sent(self.handle.id, seq, pid, d.order) {
                    self.pending_ops.push(Op::Dequeue {
                        session_id: self.handle.id,
                        seq,
                    });
                    let mut rec = inflight_record(pid, &d, false);
                    rec.entry.msg_id = msg_id;
                    self.pending_ops.push(Op::PutInflight {
                        session_id: self.handle.id,
                        rec,
                    });
                }
            }
            if let (Some(seq), true) = (d.seq, d.stored) {
                if d.qos == QoS::ExactlyOnce {
                    self.gate.hold_from(wbuf.len());
                }
                // Queue entry → in-flight record, in one submit (the message's reference
                // moves with it).
                self.pending_ops.push(Op::Dequeue {
                    session_id: self.queue_of(&d),
                    seq,
                });
                self.pending_ops.push(Op::PutInflight {
                    session_id: self.handle.id,
                    rec: inflight_record(pid, &d, false),
                });
            }
        } else {
            // Sent at QoS 0: finished (a group's stored message may be delivered at QoS 0 to
            // a member that subscribed with it).
            self.stage_dequeue(&d);
        }
        encode_publish(wbuf, self.version, &out);
        self.tally.sent[d.qos as usize] += 1;
        self.tally.packets_out[usize::from(kind::PUBLISH)] += 1;
        if self.broker.tracer.active() {
            let group = self.group_of(&d).map(|g| &**g);
            let pid = out.packet_id;
            self.broker
                .tracer
                .sent(&self.client_id, &d, pid, false, group);
        }
    }

    /// An in-flight delivery is finished: its durable record goes.
    pub(super) fn stage_inflight_done(&mut self, packet_id: u16) {
        if self.stores_session() {
            self.pending_ops.push(Op::DeleteInflight {
                session_id: self.handle.id,
                packet_id,
            });
        }
    }

    /// A QoS 2 delivery was just released (PUBREC'd): when this session is stored and so is
    /// the message, its in-flight record becomes "released", staged for the next submit.
    /// Returns whether it did; the PUBREL must then wait for that commit (the write gate), or a
    /// crash in between would bring the message back as new.
    pub(super) fn stage_released(&mut self, packet_id: u16) -> bool {
        if !self.stores_session() {
            return false;
        }
        let Some(Outbound::Released(d)) = self.state.inflight.get(packet_id) else {
            return false;
        };
        if !d.stored {
            return false;
        }
        let rec = inflight_record(packet_id, d, true);
        self.pending_ops.push(Op::PutInflight {
            session_id: self.handle.id,
            rec,
        });
        true
    }

    /// A QoS 1 delivery sent under `packet_id` is finished (PUBACK, or revoked as if
    /// acknowledged): its durable record goes, the early ledger's entry if it is an early
    /// delivery (whose in-flight record, if any, the ledger names), and its group's credit.
    pub(super) fn qos1_finished(&mut self, packet_id: u16, d: &Delivery) {
        if d.early.is_some() {
            self.early_done(d);
        } else {
            self.stage_inflight_done(packet_id);
        }
        self.group_delivery_done(d, true, true);
    }

    /// Consumer lag: delivery `d` was acknowledged (PUBACK for QoS 1, PUBCOMP for QoS 2). Its
    /// publish-to-acknowledge latency goes into this session's moving average and, for a
    /// group's message, the group's average and its histogram
    /// (`tern_queue_delivery_latency_seconds`). Only routed deliveries count (a retained
    /// message sent on subscribe is as old as it is, not late), and only when the receive
    /// instant is known (not for what was in flight across a restart). Cost: a subtraction,
    /// two relaxed atomics, a histogram bucket for a group.
    pub(super) fn acknowledged(&self, d: &Delivery) {
        let Some(received) = d.msg.received.filter(|_| d.enqueued != 0) else {
            return;
        };
        let latency = self.now.saturating_duration_since(received);
        self.handle.outbox.acknowledged(latency);
        if let Some(group) = self.group_of(d) {
            group.queue.outbox.acknowledged(latency);
            group.metrics.latency.observe(latency.as_secs_f64());
        }
    }

    /// An early delivery (`broker/early.rs`) is finished: what its stream copy stored
    /// meanwhile, if anything, goes (the ledger says; if the stream copy has not come yet, it
    /// stores nothing).
    pub(super) fn early_done(&mut self, d: &Delivery) {
        let Some(seq) = d.early else {
            return;
        };
        let session_id = self.handle.id;
        match self.broker.early.finished(session_id, seq, self.now) {
            Finished::Nothing => {}
            Finished::Dequeue => self.pending_ops.push(Op::Dequeue { session_id, seq }),
            Finished::DeleteInflight(packet_id) => self.pending_ops.push(Op::DeleteInflight {
                session_id,
                packet_id,
            }),
        }
    }

    /// A delivery that is finished without an acknowledgement (sent at QoS 0, or never to be
    /// sent) leaves its durable queue and gives its group credit back.
    fn stage_dequeue(&mut self, d: &Delivery) {
        self.early_done(d);
        if let Some(seq) = d.seq {
            self.pending_ops.push(Op::Dequeue {
                session_id: self.queue_of(d),
                seq,
            });
        }
        if let Some(g) = self.group_of(d) {
            g.release(self.handle.id);
        }
        self.group_finished(d);
    }

    fn aliases_enabled(&self) -> bool {
        self.aliases.outbound_enabled()
    }

    /// On reconnect of a session: re-send unacknowledged PUBLISHes with DUP and pending PUBRELs,
    /// in their original order and with their original packet ids ([MQTT-4.4.0-1]).
    ///
    /// The in-flight state re-sent here may not be stored yet: the previous connection (just
    /// taken over, or gone a moment ago) submitted its last records, but their commit may still
    /// be running. Sent before that, a broker crash would recover the older state and deliver
    /// a QoS 2 message the client already has as new (or re-send a PUBLISH the client
    /// completed): a duplicate. So the re-sends sit behind the write gate until a commit
    /// submitted now, after all of those, is done (found by the deterministic simulation).
    ///
    /// Messages this connection may no longer read are not re-sent (see
    /// [`Client::revoke_inflight`]).
    pub fn resend_inflight(&mut self, wbuf: &mut BytesMut) {
        if self.state.inflight.is_empty() {
            return;
        }
        if self.stores_session() {
            let barrier = self.broker.store.submit(Vec::new());
            self.gate.hold_commit(wbuf.len(), Some(barrier));
        }
        let released = self.revoke_inflight();
        let now = self.now;
        let version = self.version;
        let mount = self.extras.as_ref().and_then(|e| e.mount.clone());
        let inflight: &Inflight = &self.state.inflight;
        for (id, entry) in inflight.iter() {
            match entry {
                Outbound::Published(d) => {
                    let expiry = d.msg.remaining_expiry(now).unwrap_or(Some(1));
                    let topic = d.msg.topic.as_str();
                    let topic = mount
                        .as_deref()
                        .and_then(|m| topic.strip_prefix(m))
                        .unwrap_or(topic);
                    let out = OutgoingPublish {
                        topic: topic.as_bytes(),
                        qos: d.qos,
                        retain: d.retain,
                        dup: true,
                        packet_id: *id,
                        properties: &d.msg.properties,
                        extras: PublishExtras {
                            message_expiry_interval: expiry,
                            topic_alias: None,
                            subscription_identifiers: d.sub_ids.as_slice(),
                        },
                        payload: &d.msg.payload,
                    };
                    encode_publish(wbuf, version, &out);
                    self.tally.sent[d.qos as usize] += 1;
                    self.tally.packets_out[usize::from(kind::PUBLISH)] += 1;
                    if self.broker.tracer.active() {
                        let group = self.group_of(d).map(|g| &**g);
                        self.broker
                            .tracer
                            .sent(&self.client_id, d, *id, true, group);
                    }
                }
                Outbound::Released(_) => {
                    if released.contains(id) {
                        // Sent only once its released state is stored, like any PUBREL.
                        self.gate.hold_from(wbuf.len());
                    }
                    encode_pub_response(wbuf, version, PUBREL, *id, 0);
                    self.tally.packets_out[usize::from(kind::PUBREL)] += 1;
                }
            }
        }
    }

    /// Before re-sending in-flight messages: those this connection may no longer read (the ACL
    /// was reloaded since they were sent, or the session came back under another user name)
    /// are not sent again, and count as dropped (not_authorized):
    /// - QoS 1: finished as if acknowledged (the receiver keeps no state for it);
    /// - QoS 2 before PUBREC: released instead, as if PUBREC'd, so PUBREL goes in place of the
    ///   PUBLISH. A client that did receive it (its PUBREC lost with the connection) still
    ///   holds the packet id until PUBREL and would take a later message under the same id
    ///   for a duplicate; one that did not answers PUBCOMP (0x92 in MQTT 5).
    ///
    /// A QoS 2 message already PUBREC'd always finishes (its PUBREL is re-sent): the client
    /// has it. Returns the packet ids released here whose state is being stored (their PUBREL
    /// waits for that commit).
    fn revoke_inflight(&mut self) -> Vec<u16> {
        let acl = self.broker.auth.has_acl();
        let denied: Vec<(u16, QoS)> = self
            .state
            .inflight
            .iter()
            .filter_map(|(id, o)| match o {
                Outbound::Published(d) if self.denied(acl, d) => Some((*id, d.qos)),
                _ => None,
            })
            .collect();
        let mut released = Vec::new();
        for (id, qos) in denied {
            self.broker.metrics.dropped_not_authorized.inc();
            if qos == QoS::AtLeastOnce {
                // A QoS 1 entry, so never a `WrongAck`.
                if let Ok(Some(d)) = self.state.inflight.on_puback(id) {
                    self.qos1_finished(id, &d);
                }
                continue;
            }
            // As `handle_pubrec` does for a PUBREC with reason 0.
            if let Some(Outbound::Published(d)) = self.state.inflight.get(id) {
                let d = d.clone();
                self.group_delivery_done(&d, true, false);
            }
            // A QoS 2 entry still Published, so never a `WrongAck`.
            let _ = self.state.inflight.on_pubrec(id, 0);
            if self.stage_released(id) {
                released.push(id);
            }
        }
        released
    }
}
