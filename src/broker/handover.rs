//! A persistent session moving from one cluster node to another, the broker's part: taking
//! the session out of this node's routing, writing it out as a
//! [`SessionSnapshot`](crate::storage::record::SessionSnapshot), and on the receiving node
//! taking a snapshot in as the connecting client's session. What decides *when* (the order
//! against the cluster's messages stream, so that nothing is lost or doubled at the seam) is
//! the cluster's (`cluster/sessions.rs`); this file knows nothing of NATS.
//!
//! Messages travel whole in the snapshot and are stored here under new ids: ids are per node.
//! In-flight deliveries keep their packet ids, so the client's side of unfinished QoS 1/2
//! exchanges still matches after the move ([MQTT-4.4.0-1]: they are re-sent on the new node).

use super::shared::Membership;
use super::{shared, Broker, Staged};
use crate::message::Message;
use crate::outbox::{Delivery, SubIds};
use crate::session::registry::SessionHandle;
use crate::session::{Outbound, SessionState, Subscription};
use crate::storage::record::{
    unix_now_ms, InflightRecord, QueueEntry, SessionSnapshot, StoredMessage,
};
use crate::storage::{Op, StorageError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long an export waits for deliveries still being committed into the queue.
const SETTLE: Duration = Duration::from_secs(5);

fn entry_of(d: &Delivery, msg_id: u64) -> QueueEntry {
    QueueEntry {
        msg_id,
        qos: d.qos,
        retain: d.retain,
        sub_ids: d.sub_ids.as_slice().to_vec(),
        enqueued: d.enqueued,
    }
}

fn sub_ids(ids: &[u32]) -> SubIds {
    let mut s = SubIds::None;
    for &id in ids {
        s.push(id);
    }
    s
}

impl Broker {
    /// Stops routing into the session here: its subscriptions leave the index, shared ones
    /// leave their groups (giving back what this member held, as at a disconnect). The
    /// session's state is unchanged otherwise.
    pub fn withdraw_session(self: &Arc<Self>, handle: &SessionHandle, state: &mut SessionState) {
        self.shared_member_gone(handle, state, true);
        self.unindex(handle, state);
    }

    /// Puts the session's subscriptions into the index (and its shared ones into their
    /// groups): after an import, or when a handover did not complete.
    pub fn install_subscriptions(
        self: &Arc<Self>,
        handle: &Arc<SessionHandle>,
        state: &SessionState,
    ) {
        for (filter, sub) in &state.subscriptions {
            match shared::membership(filter) {
                Some(Ok(Membership::Shared { share, filter: f })) => {
                    self.subscribe_shared(handle, share, f, sub.options, sub.id, false, 0);
                }
                Some(Ok(Membership::Queue(name))) => {
                    self.subscribe_queue(handle, name, sub.options, sub.id, false, 0);
                }
                Some(Err(())) => {}
                None => {
                    self.subscribe(handle, filter, sub.options, sub.id);
                }
            }
        }
    }

    /// The session as a snapshot (its `position` is the caller's to set). Call after
    /// [`Broker::withdraw_session`]: it waits for deliveries still being committed into the
    /// queue, then reads the queue without changing it, the part on disk included.
    pub async fn export_session(
        &self,
        handle: &SessionHandle,
        state: &SessionState,
    ) -> Result<SessionSnapshot, StorageError> {
        let deadline = tokio::time::Instant::now() + SETTLE;
        while handle.outbox.open_reservations() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let now = crate::clock::now();
        let unix = unix_now_ms();
        let stored = |m: &Message| StoredMessage::from_message(m, now, unix);
        let mut snap = SessionSnapshot {
            subscriptions: state.subscription_records(),
            ..Default::default()
        };
        for (packet_id, o) in state.inflight.iter() {
            let d = o.delivery();
            let rec = InflightRecord {
                packet_id: *packet_id,
                order: d.order,
                entry: entry_of(d, d.msg.id),
                released: matches!(o, Outbound::Released(_)),
                group: None,
            };
            snap.inflight.push((rec, stored(&d.msg)));
        }
        snap.qos2 = state.inbound_qos2.iter().copied().collect();
        snap.qos2.sort_unstable();
        for d in handle.outbox.memory_items() {
            snap.queue.push((entry_of(&d, d.msg.id), stored(&d.msg)));
        }
        if let Some((mut from, below, _)) = handle.outbox.spill_head() {
            while from < below {
                let entries = self.store.read_queue(handle.id, from, 256)?;
                let entries: Vec<_> = entries
                    .into_iter()
                    .take_while(|(s, _)| *s < below)
                    .collect();
                let Some((last, _)) = entries.last() else {
                    break;
                };
                from = last + 1;
                let ids: Vec<u64> = entries.iter().map(|(_, e)| e.msg_id).collect();
                let messages = self.store.get_messages(&ids)?;
                for ((_, e), m) in entries.into_iter().zip(messages) {
                    // A message gone from disk (expired and swept) is not in the queue.
                    if let Some(m) = m {
                        snap.queue.push((e, m));
                    }
                }
            }
        }
        Ok(snap)
    }

    /// Takes a snapshot from another node into `handle`'s session (the connecting client's,
    /// fresh): subscriptions (not yet in the index: see [`Broker::install_subscriptions`]),
    /// in-flight deliveries with their packet ids, inbound QoS 2 ids and the queue. Returns
    /// what must be stored before the CONNACK that says Session Present; the queue's
    /// deliveries become visible when it is.
    pub fn import_session(
        &self,
        handle: &Arc<SessionHandle>,
        state: &mut SessionState,
        snap: SessionSnapshot,
    ) -> Staged {
        let now = crate::clock::now();
        let unix = unix_now_ms();
        let durable = self.store.durable() && handle.persistent.load(Ordering::Relaxed);
        let mut staged = Staged::default();
        let rebuild = |m: &StoredMessage| {
            let mut msg = m.to_message(now, unix);
            msg.id = self.next_message_id();
            msg.origin = 0;
            Arc::new(msg)
        };
        for sub in snap.subscriptions {
            state.subscriptions.insert(
                sub.filter.clone(),
                Subscription {
                    options: sub.options,
                    id: sub.id,
                },
            );
            if durable {
                staged.ops.push(Op::PutSubscription {
                    client_id: handle.client_id.to_string(),
                    sub,
                });
            }
        }
        for (rec, m) in snap.inflight {
            let msg = rebuild(&m);
            let mut d = Delivery::new(
                msg.clone(),
                rec.entry.qos,
                rec.entry.retain,
                sub_ids(&rec.entry.sub_ids),
            );
            d.order = rec.order;
            d.stored = durable;
            state.next_order = state.next_order.max(rec.order + 1);
            if durable {
                staged
                    .ops
                    .push(Op::PutMessage(StoredMessage::from_message(&msg, now, unix)));
                staged.ops.push(Op::PutInflight {
                    session_id: handle.id,
                    rec: InflightRecord {
                        entry: entry_of(&d, msg.id),
                        group: None,
                        ..rec.clone()
                    },
                });
            }
            let o = if rec.released {
                Outbound::Released(d)
            } else {
                Outbound::Published(d)
            };
            state.inflight.restore(rec.packet_id, o);
        }
        for id in snap.qos2 {
            state.inbound_qos2.insert(id);
            if durable {
                staged.ops.push(Op::PutQos2 {
                    session_id: handle.id,
                    packet_id: id,
                });
            }
        }
        for (e, m) in snap.queue {
            let msg = rebuild(&m);
            if msg.is_expired(now) {
                continue;
            }
            let d = Delivery::new(msg.clone(), e.qos, e.retain, sub_ids(&e.sub_ids));
            let mut staging = durable.then(|| super::staged::Staging::new(&msg, &mut staged));
            self.deliver(handle, d, staging.as_mut());
        }
        staged
    }

    /// The session went to another node: it ends here without its will (its client is
    /// connected there) and its stored state is deleted.
    pub fn end_handed_over(self: &Arc<Self>, handle: &SessionHandle, state: &mut SessionState) {
        if self
            .registry
            .remove_handed_over(&handle.client_id, handle.id)
        {
            self.end_session(handle, state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Authorizer;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::protocol::{MqttStr, PublishProperties, QoS, SubscriptionOptions};
    use crate::storage::MemoryStore;
    use bytes::Bytes;

    fn broker() -> Arc<Broker> {
        let config = Config::default();
        let auth = Authorizer::load(&config.mqtt.response_prefix, &config.auth).unwrap();
        Arc::new(Broker::new(
            config,
            Metrics::new().unwrap(),
            Arc::new(MemoryStore),
            auth,
        ))
    }

    fn msg(b: &Broker, topic: &str, qos: QoS) -> Arc<Message> {
        Arc::new(Message {
            id: b.next_message_id(),
            topic: MqttStr::from(topic),
            payload: Bytes::from(topic.to_string()),
            qos,
            retain: false,
            properties: PublishProperties::default(),
            expires_at: None,
            origin: 0,
            received: None,
        })
    }

    /// What one node exports, another takes in whole: subscriptions (routing again once
    /// installed), in-flight deliveries under the same packet ids and states, inbound QoS 2
    /// ids, and the queue in order.
    #[tokio::test]
    async fn a_session_moves_whole_between_two_brokers() {
        let a = broker();
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let mut att = a
            .registry
            .attach("c", 1, 60, tx, Duration::from_secs(1))
            .await
            .unwrap();
        let handle = att.handle.clone();
        handle.persistent.store(true, Ordering::Relaxed);
        let opts = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..Default::default()
        };
        att.state.subscriptions.insert(
            "a/+".into(),
            Subscription {
                options: opts,
                id: Some(7),
            },
        );
        a.subscribe(&handle, "a/+", opts, Some(7));
        let mut d1 = Delivery::new(
            msg(&a, "a/1", QoS::AtLeastOnce),
            QoS::AtLeastOnce,
            false,
            SubIds::None,
        );
        d1.order = 3;
        att.state.inflight.restore(11, Outbound::Published(d1));
        let d2 = Delivery::new(
            msg(&a, "a/2", QoS::ExactlyOnce),
            QoS::ExactlyOnce,
            false,
            SubIds::None,
        );
        att.state.inflight.restore(12, Outbound::Released(d2));
        att.state.inbound_qos2.insert(5);
        for t in ["a/3", "a/4"] {
            a.push(
                &handle,
                Delivery::new(
                    msg(&a, t, QoS::AtLeastOnce),
                    QoS::AtLeastOnce,
                    false,
                    SubIds::None,
                ),
            );
        }
        a.withdraw_session(&handle, &mut att.state);
        let mut scratch = Vec::new();
        let mut staged = Staged::default();
        assert_eq!(
            a.publish(&msg(&a, "a/9", QoS::AtLeastOnce), &mut scratch, &mut staged)
                .matched,
            0,
            "withdrawn"
        );
        let mut snap = a.export_session(&handle, &att.state).await.unwrap();
        snap.position = 42;
        let snap = SessionSnapshot::decode(&snap.encode()).unwrap();
        assert_eq!(snap.position, 42);

        let b = broker();
        let (tx, _rx) = tokio::sync::oneshot::channel();
        let mut btt = b
            .registry
            .attach("c", 1, 60, tx, Duration::from_secs(1))
            .await
            .unwrap();
        let bh = btt.handle.clone();
        bh.persistent.store(true, Ordering::Relaxed);
        let staged = b.import_session(&bh, &mut btt.state, snap);
        assert!(staged.ops.is_empty(), "memory store: nothing to write");
        b.install_subscriptions(&bh, &btt.state);
        assert_eq!(btt.state.subscriptions["a/+"].id, Some(7));
        let inflight: Vec<_> = btt
            .state
            .inflight
            .iter()
            .map(|(id, o)| {
                (
                    *id,
                    matches!(o, Outbound::Released(_)),
                    o.delivery().msg.topic.to_string(),
                )
            })
            .collect();
        assert_eq!(
            inflight,
            vec![
                (11, false, "a/1".to_string()),
                (12, true, "a/2".to_string())
            ]
        );
        assert!(btt.state.inbound_qos2.contains(&5));
        assert!(btt.state.next_order >= 4);
        let queued: Vec<_> = bh
            .outbox
            .memory_items()
            .iter()
            .map(|d| d.msg.topic.to_string())
            .collect();
        assert_eq!(queued, ["a/3", "a/4"]);
        let mut scratch = Vec::new();
        let mut staged = Staged::default();
        assert_eq!(
            b.publish(&msg(&b, "a/5", QoS::AtLeastOnce), &mut scratch, &mut staged)
                .matched,
            1,
            "routed on the new node"
        );
    }
}
