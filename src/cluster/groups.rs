//! Shared subscription groups across nodes: the members of `$share/G/F` on every node form
//! one group, and each message of the group goes to one node, which hands it to one of its
//! members (the group's strategy and credit, `broker/shared/`, hold within that node).
//!
//! | messages | how one node is chosen |
//! |---|---|
//! | QoS 1/2 | one durable pull consumer per group on the messages stream, filtered by the group's filter; every node with members pulls from it as much as its group queue has room for, so faster nodes take more |
//! | QoS 0 | one NATS queue group per group on the QoS 0 subjects; NATS gives each message to one subscribed node |
//!
//! A pulled QoS 1/2 message is acknowledged to JetStream only when a member here is finished
//! with it (its PUBACK or PUBREC, or it was sent at QoS 0: `Peers::group_done`). Until then
//! the node tells JetStream every five seconds that it is still working on it, so it is not
//! given to another node meanwhile; if the node dies, the message comes back after the
//! consumer's ack wait and goes to a member on another node: a group loses nothing with a
//! node, at the price of a possible second delivery. One that does not fit the group queue
//! here is NAKed to come back (possibly to another node) a second later, and when the group
//! ends here what it still held goes back the same way.
//!
//! While a node has no member of a group it neither pulls nor subscribes, and its routing
//! leaves groups out altogether (`Broker::route`), so a message never reaches a group twice
//! through two nodes (but for the redeliveries above).
//!
//! A declared queue (`$queue/NAME`) is one queue across the nodes the same way, with three
//! differences: its consumer is made when the queue is declared (so it collects from then on,
//! whether or not any consumer exists anywhere) and never expires; it takes QoS 1/2 only (no
//! queue group); and a node pulls only while one of its consumers is connected here; when the
//! last one leaves, what the node held and had not handed out goes back to JetStream (NAK)
//! for the other nodes. The node's group queue is then a memory buffer of messages JetStream
//! holds for it: the queue's durability is JetStream's.

use super::{wire, Names};
use crate::broker::shared::{Group, Kind};
use crate::broker::Broker;
use crate::storage::Commit;
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    AckKind,
};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// Messages a node's group queue may hold before the node stops pulling more for it.
const HIGH_WATER: usize = 256;

pub(crate) struct ClusterGroups {
    pub(crate) broker: Arc<Broker>,
    /// A NATS connection that receives its own node's publishes (the main one does not),
    /// since a node's queue group member must be able to win its own node's messages.
    pub(crate) echo: async_nats::Client,
    pub(crate) msgs: jetstream::stream::Stream,
    pub(crate) names: Arc<Names>,
    pub(crate) replicas: usize,
    /// How long JetStream keeps a group consumer nobody pulls from.
    pub(crate) idle: Duration,
    pub(crate) running: Mutex<HashMap<String, Vec<AbortHandle>>>,
    /// Messages pulled for a group and not yet finished by a member here, by this node's
    /// message id (several ids share one JetStream message when it was a batch).
    pub(crate) held: Mutex<HashMap<u64, HeldMessage>>,
    /// Per group started here: how many of its two feeds (the consumer, the queue
    /// subscription) are in place. A SUBACK that made the group waits for both
    /// ([`ClusterGroups::ready`]), or messages published right after it would miss the group.
    pub(crate) feeds: Mutex<HashMap<String, watch::Receiver<u8>>>,
}

/// How long a SUBACK waits for a new group's feeds before the subscription fails.
const FEEDS_WAIT: Duration = Duration::from_secs(10);

/// One JetStream message a group's consumer gave this node: acknowledged when the members
/// here are finished with every message of it that the group took (`left`).
pub(crate) struct Held {
    key: String,
    m: jetstream::Message,
    left: AtomicUsize,
}

/// One message of a [`Held`] one.
pub(crate) struct HeldMessage {
    held: Arc<Held>,
    expires_at: Option<std::time::Instant>,
}

impl Held {
    /// One of its messages is finished with: true when it was the last.
    fn finish(&self) -> bool {
        self.left.fetch_sub(1, Ordering::AcqRel) == 1
    }
}

/// The distinct JetStream messages among `held` (a batch's messages share one).
fn distinct(held: impl IntoIterator<Item = Arc<Held>>) -> Vec<Arc<Held>> {
    let mut out: Vec<Arc<Held>> = Vec::new();
    for h in held {
        if !out.iter().any(|o| Arc::ptr_eq(o, &h)) {
            out.push(h);
        }
    }
    out
}

/// How often held messages are reported as still in progress (well within `ACK_WAIT`).
const PROGRESS: Duration = Duration::from_secs(5);
/// When JetStream gives a held message that was not reported in progress to another node.
const ACK_WAIT: Duration = Duration::from_secs(15);

/// A group's name in NATS: consumer and queue group names may not hold its filter's bytes.
fn group_name(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut s = String::from("grp_");
    for b in &digest[..12] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl ClusterGroups {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<AbortHandle>>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn start(self: &Arc<Self>, group: &Arc<Group>) {
        let key = group.key();
        let name = group_name(&key);
        let (fed, feeds) = watch::channel(0u8);
        let fed = Arc::new(fed);
        self.feeds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), feeds);
        let pull = tokio::spawn(self.clone().pull(group.clone(), name.clone(), fed.clone()));
        let mut handles = vec![pull.abort_handle()];
        if group.kind == Kind::Shared {
            let live = tokio::spawn(self.clone().live(group.clone(), name, fed));
            handles.push(live.abort_handle());
        } else {
            // A declared queue keeps no QoS 0: its one feed is the consumer.
            fed.send_modify(|n| *n += 1);
        }
        let previous = self.running().insert(key, handles);
        for h in previous.into_iter().flatten() {
            h.abort();
        }
    }

    /// Done once the group's feeds here are in place (at once for a group already running).
    pub(crate) fn ready(&self, group: &Arc<Group>) -> Commit {
        let Some(mut feeds) = self
            .feeds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&group.key())
            .cloned()
        else {
            return Commit::Done;
        };
        if *feeds.borrow() >= 2 {
            return Commit::Done;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let fed = tokio::time::timeout(FEEDS_WAIT, feeds.wait_for(|n| *n >= 2)).await;
            if matches!(fed, Ok(Ok(_))) {
                let _ = tx.send(());
            }
        });
        Commit::Pending(rx)
    }

    pub(crate) fn end(&self, group: &Arc<Group>) {
        let key = group.key();
        self.feeds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        if let Some(handles) = self.running().remove(&key) {
            for h in handles {
                h.abort();
            }
        }
        // What the group still held here goes back, to a member elsewhere (a batch whole,
        // with any of its messages already finished here: at least once).
        self.give_back(&key);
    }

    /// Gives what the group `key` holds here back to JetStream (NAK), for another node.
    fn give_back(&self, key: &str) {
        let back = {
            let mut held = self.held();
            let ids: Vec<u64> = held
                .iter()
                .filter(|(_, h)| h.held.key == key)
                .map(|(id, _)| *id)
                .collect();
            distinct(
                ids.into_iter()
                    .filter_map(|id| held.remove(&id).map(|h| h.held)),
            )
        };
        if !back.is_empty() {
            tokio::spawn(async move {
                for h in back {
                    let _ = h.m.ack_with(AckKind::Nak(None)).await;
                }
            });
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HeldMessage>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A member here finished with message `msg_id`: the group's consumer lets go of its
    /// JetStream message once every message of it is finished.
    pub(crate) fn done(&self, msg_id: u64) {
        let Some(h) = self.held().remove(&msg_id) else {
            return;
        };
        if h.held.finish() {
            tokio::spawn(async move {
                let _ = h.held.m.ack().await;
            });
        }
    }

    /// Tells JetStream, for good, that the held messages are still being worked on.
    pub(crate) async fn keep_alive(self: Arc<Self>) {
        loop {
            tokio::time::sleep(PROGRESS).await;
            let now = crate::clock::now();
            let (alive, finished) = {
                let mut held = self.held();
                // A message that expired is dropped by the group: let it go too.
                let expired_ids: Vec<u64> = held
                    .iter()
                    .filter(|(_, h)| h.expires_at.is_some_and(|t| t <= now))
                    .map(|(id, _)| *id)
                    .collect();
                let finished: Vec<Arc<Held>> = expired_ids
                    .into_iter()
                    .filter_map(|id| held.remove(&id))
                    .filter(|h| h.held.finish())
                    .map(|h| h.held)
                    .collect();
                let alive: Vec<_> = distinct(held.values().map(|h| h.held.clone()))
                    .into_iter()
                    .map(|h| (h.m.reply.clone(), h.m.context.clone()))
                    .collect();
                (alive, finished)
            };
            for h in finished {
                let _ = h.m.ack().await;
            }
            for (reply, context) in alive {
                if let Some(reply) = reply {
                    let _ = context
                        .client()
                        .publish(reply, bytes::Bytes::from_static(b"+WPI"))
                        .await;
                }
            }
        }
    }

    /// What a declared queue's node held goes back to JetStream, for the other nodes: its last
    /// consumer here left.
    fn release_here(&self, group: &Group) {
        group.queue.outbox.clear();
        self.give_back(&group.key());
    }

    /// Pulls the group's QoS 1/2 messages as long as the group has a member here (a declared
    /// queue: a connected one).
    async fn pull(self: Arc<Self>, group: Arc<Group>, name: String, fed: Arc<watch::Sender<u8>>) {
        let declared = group.kind != Kind::Shared;
        // A bridge's queue takes every `out` filter (JetStream 2.10's filter_subjects);
        // everything else has one.
        let mut filters: Vec<String> = group
            .filters()
            .iter()
            .map(|f| self.names.msgs.filter(f))
            .collect();
        let (filter_subject, filter_subjects) = if filters.len() > 1 {
            (String::new(), filters)
        } else {
            (filters.pop().unwrap_or_default(), Vec::new())
        };
        let config = pull::Config {
            durable_name: Some(name.clone()),
            deliver_policy: DeliverPolicy::New,
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: 10_000,
            filter_subject,
            filter_subjects,
            num_replicas: self.replicas,
            // A declared queue's consumer is the queue: it outlives every node's absence.
            inactive_threshold: if declared { Duration::ZERO } else { self.idle },
            description: Some(format!("Tern {}", group.key())),
            ..Default::default()
        };
        let consumer = loop {
            // A declared queue's consumer is made or updated to the configuration (a reload
            // may change its filter); a shared group's is taken as it is.
            let made = if declared {
                self.msgs.create_consumer(config.clone()).await
            } else {
                self.msgs
                    .get_or_create_consumer(&name, config.clone())
                    .await
            };
            match made {
                Ok(c) => {
                    fed.send_modify(|n| *n += 1);
                    break c;
                }
                Err(e) => {
                    tracing::warn!(group = %group.key(), error = %e, "group consumer; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let mut holding = false;
        loop {
            if declared && !group.queue.outbox.is_online() {
                if holding {
                    self.release_here(&group);
                    holding = false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            holding = true;
            let queued = group.queue.outbox.len();
            if queued >= HIGH_WATER {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            // A JetStream message may hold a batch of one topic's messages (`wire.rs`), tens of
            // them: a declared queue's node takes a few at a time, so that a backlog is shared
            // among the nodes with consumers rather than taken whole by the first to ask.
            let want = if declared {
                ((HIGH_WATER - queued) / 64).clamp(1, 4)
            } else {
                (HIGH_WATER - queued).min(128)
            };
            let batch = consumer
                .fetch()
                .max_messages(want)
                .expires(Duration::from_secs(1))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(group = %group.key(), error = %e, "group fetch");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(item) = batch.next().await {
                let Ok(m) = item else { continue };
                let next = || self.broker.next_message_id();
                // A bridge's queue needs the origin of every message, whichever node published
                // it, to leave out what its own bridge brought in.
                let bridge = group.kind == Kind::Bridge;
                let Some(mut msgs) = wire::decode_all(m.headers.as_ref(), &m.payload, next, bridge)
                else {
                    let _ = m.ack_with(AckKind::Term).await;
                    continue;
                };
                if bridge {
                    msgs.retain(|msg| msg.origin != group.origin);
                    if msgs.is_empty() {
                        let _ = m.ack().await;
                        continue;
                    }
                }
                self.broker
                    .metrics
                    .cluster
                    .in_stream
                    .inc_by(msgs.len() as u64);
                // A batch is taken whole or not at all while the queue here has anything
                // else (it comes back whole); only a batch larger than an empty queue's
                // limits loses what does not fit, counted as dropped like any full queue.
                let outbox = &group.queue.outbox;
                let weight = msgs.iter().map(|m| m.weight()).sum();
                if msgs.len() > 1 && !outbox.fits(msgs.len(), weight) && !outbox.is_empty() {
                    let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                    continue;
                }
                let enqueued = m
                    .info()
                    .map(|i| i.published.unix_timestamp().clamp(0, u32::MAX.into()) as u32)
                    .unwrap_or(0);
                let mut taken = Vec::with_capacity(msgs.len());
                for msg in &msgs {
                    match self.broker.publish_to_group(&group, msg, enqueued) {
                        Some(Commit::Failed) | None => {}
                        Some(_) => taken.push((msg.id, msg.expires_at)),
                    }
                }
                if taken.is_empty() {
                    // Full here or not stored: back to the group, for this node or another.
                    let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                    continue;
                }
                // Acknowledged when the members here are done with all of it (`done`).
                let held = Arc::new(Held {
                    key: group.key(),
                    m,
                    left: AtomicUsize::new(taken.len()),
                });
                let mut map = self.held();
                for (id, expires_at) in taken {
                    map.insert(
                        id,
                        HeldMessage {
                            held: held.clone(),
                            expires_at,
                        },
                    );
                }
            }
        }
    }

    /// Takes this node's share of the group's QoS 0 messages.
    async fn live(self: Arc<Self>, group: Arc<Group>, name: String, fed: Arc<watch::Sender<u8>>) {
        let subject = self.names.live.filter(&group.filter());
        let mut sub = loop {
            match self
                .echo
                .queue_subscribe(subject.clone(), name.clone())
                .await
            {
                Ok(s) => {
                    // In place once the server has it.
                    let _ = self.echo.flush().await;
                    fed.send_modify(|n| *n += 1);
                    break s;
                }
                Err(e) => {
                    tracing::warn!(group = %group.key(), error = %e, "group queue subscription; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        while let Some(m) = sub.next().await {
            if let Some(msg) = wire::decode(&m.payload, self.broker.next_message_id(), false) {
                self.broker.metrics.cluster.in_live.inc();
                let _ = self.broker.publish_to_group(&group, &msg, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn group_names_are_valid_nats_names() {
        let a = super::group_name("$share/g/a/+/#");
        assert!(a.starts_with("grp_") && a.len() == 28);
        assert!(a[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, super::group_name("$share/g/a/+"));
    }
}
