//! Wills: the message a session leaves for when its connection ends without a DISCONNECT
//! (MQTT 5 §3.1.3.2, [MQTT-3.1.2-8]), published at once or after its Will Delay Interval.
//! A will is published by the broker, for nobody's acknowledgement: what it routes to
//! persistent queues is committed by the store ([`Broker::commit_detached`]).

use super::Broker;
use crate::message::Message;
use crate::protocol::{QoS, Will};
use crate::storage::record::SessionRecord;
use crate::storage::Op;
use std::sync::Arc;
use std::time::Duration;

impl Broker {
    /// Turns a Will into a message and routes it.
    pub fn publish_will(self: &Arc<Self>, will: &Will, origin: u64) {
        let now = crate::clock::now();
        // The will's topic was authorised at CONNECT; only the broker's own topics are
        // checked again.
        if will.topic.as_str().starts_with('$') {
            self.metrics.dropped_not_authorized.inc();
            return;
        }
        let msg = Arc::new(Message {
            id: self.next_message_id(),
            topic: will.topic.clone(),
            payload: will.payload.clone(),
            qos: will
                .qos
                .min(QoS::from_u8(self.config.mqtt.max_qos).unwrap_or(QoS::ExactlyOnce)),
            retain: will.retain,
            properties: will.properties.clone(),
            expires_at: Message::deadline_from(will.properties.message_expiry_interval, now),
            origin,
            received: Some(now),
        });
        self.publish_detached(&msg);
    }

    /// Publishes `will` after `delay` seconds unless aborted (a reconnect) and, if the session
    /// still waits for its client then, removes the will from its durable record.
    pub fn spawn_delayed_will(
        self: &Arc<Self>,
        will: Will,
        delay: u32,
        mut record: SessionRecord,
    ) -> tokio::task::AbortHandle {
        let b = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
            b.publish_will(&will, record.session_id);
            if let Some(peers) = b.peers() {
                peers.will_settled(&record.client_id);
            }
            if b.store.durable() && b.registry.is_detached(&record.client_id, record.session_id) {
                record.will = None;
                let _ = b.store.submit(vec![Op::PutSession(record)]);
            }
        })
        .abort_handle()
    }
}
