//! The broker core: routing a message to the sessions whose subscriptions match, retained
//! messages, and the end of sessions.
//!
//! There is no router task. The publisher's own connection task calls [`Broker::publish`]:
//! it read-locks the subscription index (a `std` lock, never held across an await), collects
//! the targets into a reused `Vec`, releases the lock and pushes into each target's outbox
//! — a synchronous push that never waits. A slow subscriber slows nobody else.

pub mod retain;
pub mod trie;

use crate::auth::Authorizer;
use crate::config::Config;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::outbox::{Delivery, Pushed, SubIds};
use crate::protocol::{QoS, SubscriptionOptions, Will};
use crate::session::registry::{Registry, SessionHandle};
use crate::session::SessionState;
use crate::storage::Store;
use retain::{RetainOutcome, RetainTree};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};
use trie::Trie;

/// One entry of the subscription index.
#[derive(Clone)]
pub struct Subscriber {
    pub session: Arc<SessionHandle>,
    pub options: SubscriptionOptions,
    pub id: Option<u32>,
}

pub struct Broker {
    pub config: Config,
    pub registry: Registry,
    pub metrics: Metrics,
    pub store: Arc<dyn Store>,
    pub auth: Authorizer,
    subscriptions: RwLock<Trie<Subscriber>>,
    retained: RwLock<RetainTree>,
    next_message_id: AtomicU64,
    next_connection_id: AtomicU64,
}

/// Result of routing one message.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    /// Sessions that matched.
    pub matched: usize,
    /// Of those, how many could not take it (full queue).
    pub dropped: usize,
}

impl Broker {
    pub fn new(config: Config, metrics: Metrics, store: Arc<dyn Store>) -> Broker {
        Broker {
            registry: Registry::new(
                config.limits.max_queued_messages,
                config.limits.max_queued_bytes,
            ),
            auth: Authorizer::new(&config.mqtt.response_prefix),
            config,
            metrics,
            store,
            subscriptions: RwLock::new(Trie::new()),
            retained: RwLock::new(RetainTree::default()),
            next_message_id: AtomicU64::new(1),
            next_connection_id: AtomicU64::new(1),
        }
    }

    pub fn next_message_id(&self) -> u64 {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn retained_count(&self) -> usize {
        self.retained
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Routes `msg` to every matching subscription; also stores it as retained when its
    /// RETAIN flag is set. `scratch` is the caller's reused buffer.
    pub fn publish(&self, msg: &Arc<Message>, scratch: &mut Vec<Subscriber>) -> Routed {
        if msg.retain && self.config.mqtt.retain_available {
            let outcome = self
                .retained
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .store(msg.clone(), self.config.limits.max_retained_messages);
            if outcome == RetainOutcome::Full {
                self.metrics.dropped_retain_full.inc();
            }
        }
        scratch.clear();
        let lists = self
            .subscriptions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .match_into(msg.topic.as_str(), scratch);
        // No Local: a subscription with it set does not match its own session's messages
        // ([MQTT-3.8.3-3]).
        scratch.retain(|s| !(s.options.no_local && s.session.id == msg.origin));
        // Entries of one filter are unique per session; only several filters can overlap.
        if lists > 1 && scratch.len() > 1 {
            scratch.sort_unstable_by_key(|s| s.session.id);
        }
        let mut routed = Routed::default();
        let rule = self.auth.receive_rule(msg.topic.as_str());
        let mut i = 0;
        while i < scratch.len() {
            // Overlapping subscriptions of one session: one copy at the highest QoS, with every
            // matching subscription identifier ([MQTT-3.3.4-2] .. [MQTT-3.3.4-5]).
            let session = &scratch[i].session;
            let mut qos = scratch[i].options.qos;
            let mut retain_as_published = scratch[i].options.retain_as_published;
            let mut sub_ids = SubIds::None;
            let mut j = i;
            while j < scratch.len() && Arc::ptr_eq(&scratch[j].session, session) {
                qos = qos.max(scratch[j].options.qos);
                retain_as_published |= scratch[j].options.retain_as_published;
                if let Some(id) = scratch[j].id {
                    sub_ids.push(id);
                }
                j += 1;
            }
            if rule.allows(&session.client_id) {
                routed.matched += 1;
                let delivery = Delivery {
                    msg: msg.clone(),
                    qos: qos.min(msg.qos),
                    // Live messages carry RETAIN=0 unless Retain As Published ([MQTT-3.3.1-12]
                    // [MQTT-3.3.1-13]).
                    retain: retain_as_published && msg.retain,
                    sub_ids,
                };
                if self.push(session, delivery) == Pushed::DroppedFull {
                    routed.dropped += 1;
                }
            } else {
                self.metrics.dropped_not_authorized.inc();
            }
            i = j;
        }
        if routed.matched == 0 && !msg.retain {
            self.metrics.dropped_no_subscribers.inc();
        }
        routed
    }

    /// Pushes into a session's outbox and counts a drop.
    pub fn push(&self, session: &SessionHandle, delivery: Delivery) -> Pushed {
        let pushed = session.outbox.push(delivery);
        if pushed == Pushed::DroppedFull {
            self.metrics.dropped_queue_full.inc();
        }
        pushed
    }

    /// Adds or replaces a subscription in the index; true if it replaced one.
    pub fn subscribe(
        &self,
        session: &Arc<SessionHandle>,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) -> bool {
        self.subscriptions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .subscribe(
                filter,
                session.id,
                Subscriber {
                    session: session.clone(),
                    options,
                    id,
                },
            )
    }

    pub fn unsubscribe(&self, session: &SessionHandle, filter: &str) -> bool {
        self.subscriptions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .unsubscribe(filter, session.id)
    }

    /// Retained messages matching `filter`, live ones only.
    pub fn retained_for(&self, filter: &str, out: &mut Vec<Arc<Message>>) {
        self.retained
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .matching(filter, out);
        let now = Instant::now();
        out.retain(|m| !m.is_expired(now));
    }

    /// Removes every subscription of an ended session and empties its queue.
    pub fn end_session(&self, handle: &SessionHandle, state: &mut SessionState) {
        if !state.subscriptions.is_empty() {
            let mut subs = self
                .subscriptions
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for filter in state.subscriptions.keys() {
                subs.unsubscribe(filter, handle.id);
            }
        }
        state.clear();
        handle.outbox.clear();
    }

    /// Turns a Will into a message and routes it.
    pub fn publish_will(&self, will: &Will, origin: u64) {
        let now = Instant::now();
        if !self.auth.can_publish("", will.topic.as_str()) {
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
        });
        let mut scratch = Vec::new();
        self.publish(&msg, &mut scratch);
    }

    /// Ends sessions whose expiry passed while their client was away, and retained messages
    /// whose Message Expiry passed. Runs once a second until the broker stops.
    pub async fn run_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Instant::now();
            for expired in self.registry.take_expired(now) {
                // Nobody is attached (checked under the registry lock), so the state is free.
                if let Ok(mut state) = expired.state.try_lock() {
                    self.end_session(&expired.handle, &mut state);
                }
                tracing::debug!(client_id = %expired.handle.client_id, "session expired");
            }
            let purged = self
                .retained
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .purge_expired(now);
            if purged > 0 {
                self.metrics.dropped_expired.inc_by(purged as u64);
            }
        }
    }
}
