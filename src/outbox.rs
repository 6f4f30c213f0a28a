//! A session's bounded delivery queue.
//!
//! Publishers push into it synchronously from their own tasks (a short mutex, never an await),
//! the session's connection drains it in batches. It belongs to the session, not the
//! connection, so it keeps filling while a persistent session is offline and a takeover
//! inherits whatever the old connection had not taken yet.
//!
//! Overflow policy (documented in docs/protocol.md): QoS 0 messages are accepted only while
//! the queue is below half of its limits, so they are dropped first and QoS 1/2 always has
//! the other half; a QoS 1/2 message that finds the queue full is dropped. Every drop is
//! reported to the caller, which counts it.

use crate::message::Message;
use crate::protocol::QoS;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::Notify;

/// Subscription identifiers that matched, applied at encode time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SubIds {
    #[default]
    None,
    One(u32),
    Many(Box<[u32]>),
}

impl SubIds {
    pub fn as_slice(&self) -> &[u32] {
        match self {
            SubIds::None => &[],
            SubIds::One(id) => std::slice::from_ref(id),
            SubIds::Many(ids) => ids,
        }
    }

    pub fn push(&mut self, id: u32) {
        *self = match std::mem::take(self) {
            SubIds::None => SubIds::One(id),
            SubIds::One(a) => SubIds::Many(vec![a, id].into_boxed_slice()),
            SubIds::Many(ids) => {
                let mut v = ids.into_vec();
                v.push(id);
                SubIds::Many(v.into_boxed_slice())
            }
        };
    }
}

/// One message for one session, with the fields that differ per subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub sub_ids: SubIds,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue is full: the message is lost for this session (counted as `queue_full`).
    DroppedFull,
    /// QoS 0 for a session that is offline: not queued, by design (not a loss of anything
    /// promised).
    SkippedOffline,
}

struct Queue {
    items: VecDeque<Delivery>,
    bytes: usize,
    online: bool,
}

pub struct Outbox {
    queue: Mutex<Queue>,
    notify: Notify,
    max_messages: usize,
    max_bytes: usize,
}

impl Outbox {
    pub fn new(max_messages: usize, max_bytes: usize) -> Outbox {
        Outbox {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                online: false,
            }),
            notify: Notify::new(),
            max_messages,
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn push(&self, d: Delivery) -> Pushed {
        let weight = d.msg.weight();
        let mut q = self.lock();
        if d.qos == QoS::AtMostOnce {
            if !q.online {
                return Pushed::SkippedOffline;
            }
            if q.items.len() >= self.max_messages / 2 || q.bytes + weight > self.max_bytes / 2 {
                return Pushed::DroppedFull;
            }
        } else if q.items.len() >= self.max_messages || q.bytes + weight > self.max_bytes {
            return Pushed::DroppedFull;
        }
        let was_empty = q.items.is_empty();
        q.items.push_back(d);
        q.bytes += weight;
        drop(q);
        if was_empty {
            self.notify.notify_one();
        }
        Pushed::Queued
    }

    /// Moves deliveries into `out`: QoS 0 freely, QoS 1/2 while `slots` (free in-flight window)
    /// lasts, at most `max` in all. Stops at the first QoS 1/2 that does not fit, keeping order.
    pub fn pop_batch(&self, mut slots: usize, max: usize, out: &mut Vec<Delivery>) {
        let mut q = self.lock();
        while out.len() < max {
            let Some(front) = q.items.front() else { break };
            if front.qos != QoS::AtMostOnce {
                if slots == 0 {
                    break;
                }
                slots -= 1;
            }
            if let Some(d) = q.items.pop_front() {
                q.bytes -= d.msg.weight();
                out.push(d);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks the session online (QoS 0 accepted) or offline.
    pub fn set_online(&self, online: bool) {
        self.lock().online = online;
        if online {
            self.notify.notify_one();
        }
    }

    /// Drops everything (a clean start); returns how many were queued.
    pub fn clear(&self) -> usize {
        let mut q = self.lock();
        let n = q.items.len();
        q.items.clear();
        q.bytes = 0;
        n
    }

    /// Resolves when something was pushed since the last wake-up.
    pub async fn ready(&self) {
        self.notify.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MqttStr, PublishProperties};
    use bytes::Bytes;

    fn d(qos: QoS) -> Delivery {
        Delivery {
            msg: Arc::new(Message {
                id: 0,
                topic: MqttStr::from("t"),
                payload: Bytes::from_static(b"123456789"),
                qos,
                retain: false,
                properties: PublishProperties::default(),
                expires_at: None,
                origin: 0,
            }),
            qos,
            retain: false,
            sub_ids: SubIds::None,
        }
    }

    #[test]
    fn qos0_is_dropped_first_and_offline_skipped() {
        let o = Outbox::new(4, 1 << 20);
        assert_eq!(o.push(d(QoS::AtMostOnce)), Pushed::SkippedOffline);
        o.set_online(true);
        assert_eq!(o.push(d(QoS::AtMostOnce)), Pushed::Queued);
        assert_eq!(o.push(d(QoS::AtMostOnce)), Pushed::Queued);
        // Half full: QoS 0 no longer accepted, QoS 1 still is.
        assert_eq!(o.push(d(QoS::AtMostOnce)), Pushed::DroppedFull);
        assert_eq!(o.push(d(QoS::AtLeastOnce)), Pushed::Queued);
        assert_eq!(o.push(d(QoS::ExactlyOnce)), Pushed::Queued);
        assert_eq!(o.push(d(QoS::AtLeastOnce)), Pushed::DroppedFull);
        assert_eq!(o.len(), 4);
    }

    #[test]
    fn byte_limit_applies() {
        let o = Outbox::new(100, 25);
        o.set_online(true);
        assert_eq!(o.push(d(QoS::AtLeastOnce)), Pushed::Queued);
        assert_eq!(o.push(d(QoS::AtLeastOnce)), Pushed::Queued);
        assert_eq!(o.push(d(QoS::AtLeastOnce)), Pushed::DroppedFull);
    }

    #[test]
    fn pop_respects_window_and_order() {
        let o = Outbox::new(100, 1 << 20);
        o.set_online(true);
        for q in [
            QoS::AtMostOnce,
            QoS::AtLeastOnce,
            QoS::AtMostOnce,
            QoS::ExactlyOnce,
            QoS::AtMostOnce,
        ] {
            o.push(d(q));
        }
        let mut out = Vec::new();
        o.pop_batch(1, 100, &mut out);
        let got: Vec<QoS> = out.iter().map(|d| d.qos).collect();
        assert_eq!(
            got,
            vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::AtMostOnce]
        );
        out.clear();
        o.pop_batch(5, 100, &mut out);
        assert_eq!(out.len(), 2);
        assert!(o.is_empty());
    }

    #[test]
    fn sub_ids_grow() {
        let mut s = SubIds::None;
        s.push(1);
        assert_eq!(s.as_slice(), &[1]);
        s.push(7);
        s.push(9);
        assert_eq!(s.as_slice(), &[1, 7, 9]);
    }
}
