//! The broker core: routing a message to the sessions whose subscriptions match, retained
//! messages, and the end of sessions.
//!
//! There is no router task. The publisher's own connection task calls [`Broker::publish`]:
//! it read-locks the subscription index (a `std` lock, never held across an await), collects
//! the targets into a reused `Vec`, releases the lock and pushes into each target's outbox
//! — a synchronous push that never waits. A slow subscriber slows nobody else.

pub mod recovery;
pub mod retain;
pub mod shared;
pub mod sys;
pub mod topics;
pub mod trie;

use crate::auth::Authorizer;
use crate::config::{Config, Limits};
use crate::message::Message;
use crate::metrics::Metrics;
use crate::outbox::{Delivery, Outbox, Pushed, Reservation, SubIds};
use crate::protocol::{QoS, SubscriptionOptions, Will};
use crate::session::registry::{Registry, SessionHandle};
use crate::session::{Outbound, SessionState};
use crate::storage::record::{unix_now_ms, QueueEntry, SessionRecord, StoredMessage};
use crate::storage::Store;
use crate::storage::{Commit, Op};
use crate::storage::{OnCommit, Outcome};
use retain::{RetainOutcome, RetainTree};
use shared::{Group, Groups};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use trie::Trie;

/// One entry of the subscription index.
#[derive(Clone)]
pub struct Subscriber {
    /// The session whose queue takes the message; for a shared subscription, the group's own
    /// queue.
    pub session: Arc<SessionHandle>,
    pub options: SubscriptionOptions,
    pub id: Option<u32>,
    /// Set for a shared subscription group's entry (one per group, not one per member).
    pub group: Option<Arc<Group>>,
}

pub struct Broker {
    /// The configuration the broker started with. `limits` may since have been reloaded:
    /// read them through [`Broker::limits`].
    pub config: Config,
    /// Current limits (SIGHUP may replace them); connections take a snapshot when they start.
    limits: RwLock<Arc<Limits>>,
    /// `sys_topics.interval` in seconds (0: off); a reload may change it.
    sys_interval: AtomicU64,
    /// `limits.backpressure`, read on every routed publish.
    backpressure: std::sync::atomic::AtomicBool,
    pub registry: Registry,
    pub metrics: Metrics,
    pub store: Arc<dyn Store>,
    pub auth: Authorizer,
    pub groups: Groups,
    /// Per-topic message counts (sampled) for the status page.
    pub topic_sampler: topics::TopicSampler,
    subscriptions: RwLock<Trie<Subscriber>>,
    retained: RwLock<RetainTree>,
    next_message_id: AtomicU64,
    next_connection_id: AtomicU64,
}

/// What a publish leaves for its commit: the operations to store, and deliveries that become
/// visible once they are stored.
#[derive(Default)]
pub struct Staged {
    pub ops: Vec<Op>,
    pub after: Vec<After>,
}

impl Staged {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.after.is_empty()
    }
}

/// A durable delivery waiting for the commit that stores it: a place reserved in a
/// persistent queue (a session's or a shared group's). It ends exactly once: made visible
/// when the commit is durable ([`After::durable`]), or its place is given back
/// ([`After::release`]) when the commit fails — and, should it ever be dropped unsettled on
/// some path, on drop. So a reservation cannot outlive its commit, whoever submitted it.
pub struct After {
    session: Arc<SessionHandle>,
    epoch: u64,
    reserved: Option<Reserved>,
}

enum Reserved {
    /// Goes into the session's memory queue once committed.
    Hot(Delivery),
    /// Lives on disk only; the session's connection loads it once committed.
    Spilled { seq: u64, weight: usize },
}

impl After {
    /// For a [`Reservation`] the session's outbox handed out; `delivery.seq` is set here.
    pub fn reserved(
        session: Arc<SessionHandle>,
        reservation: Reservation,
        mut delivery: Delivery,
    ) -> Option<After> {
        let (reserved, epoch) = match reservation {
            Reservation::Hot { seq, epoch } => {
                delivery.seq = Some(seq);
                delivery.stored = true;
                (Reserved::Hot(delivery), epoch)
            }
            Reservation::Spill { seq, epoch } => (
                Reserved::Spilled {
                    seq,
                    weight: delivery.msg.weight(),
                },
                epoch,
            ),
            Reservation::Full => return None,
        };
        Some(After {
            session,
            epoch,
            reserved: Some(reserved),
        })
    }

    /// The commit is durable: the delivery becomes visible to the session's connection.
    pub fn durable(mut self) {
        match self.reserved.take() {
            Some(Reserved::Hot(d)) => self.session.outbox.push_reserved(d, self.epoch),
            Some(Reserved::Spilled { seq, .. }) => {
                self.session.outbox.spill_committed(seq, self.epoch)
            }
            None => {}
        }
    }

    /// The commit failed: gives the place back. True if a message was lost for a queue that
    /// still wanted it (the caller counts it); false if the queue was cleared meanwhile.
    pub fn release(&mut self) -> bool {
        match self.reserved.take() {
            Some(Reserved::Hot(d)) => self
                .session
                .outbox
                .release_reserved(d.msg.weight(), self.epoch),
            Some(Reserved::Spilled { seq, weight }) => {
                self.session.outbox.release_spilled(seq, weight, self.epoch)
            }
            None => false,
        }
    }
}

impl Drop for After {
    fn drop(&mut self) {
        self.release();
    }
}

/// Overflow is logged at most once per interval (not once per message): how many messages
/// full queues dropped since the last report, in all and per shared subscription group.
#[derive(Default)]
struct DropLog {
    queue_full: u64,
    groups: std::collections::HashMap<String, u64>,
}

impl DropLog {
    fn report(&mut self, broker: &Broker) {
        let total = broker.metrics.dropped_queue_full.get();
        let new = total.saturating_sub(self.queue_full);
        self.queue_full = total;
        if new == 0 {
            return;
        }
        let mut groups = std::collections::HashMap::new();
        for g in broker.groups.all() {
            let key = g.key();
            let now = g.metrics.dropped.get();
            let before = self.groups.get(&key).copied().unwrap_or(0);
            if now > before {
                tracing::warn!(group = %key, dropped = now - before, "shared subscription group queue full: messages dropped");
            }
            groups.insert(key, now);
        }
        self.groups = groups;
        tracing::warn!(
            dropped = new,
            "queues full: messages dropped since the last report (tern_messages_dropped_total{{reason=\"queue_full\"}})"
        );
    }
}

/// Result of routing one message.
#[derive(Default, Clone)]
pub struct Routed {
    /// Sessions (and shared subscription groups) that matched.
    pub matched: usize,
    /// Of those, how many could not take it (full queue).
    pub dropped: usize,
    /// A queue this message went into that is over the back-pressure threshold
    /// (`shared.backpressure`, `limits.backpressure`): the publisher should pause.
    pub pressure: Option<Arc<SessionHandle>>,
}

impl Broker {
    pub fn new(
        config: Config,
        metrics: Metrics,
        store: Arc<dyn Store>,
        auth: Authorizer,
    ) -> Broker {
        Broker {
            registry: Registry::new(
                config.limits.max_queued_messages,
                config.limits.max_queued_bytes,
            ),
            auth,
            groups: Groups::default(),
            topic_sampler: Default::default(),
            limits: RwLock::new(Arc::new(config.limits.clone())),
            backpressure: std::sync::atomic::AtomicBool::new(config.limits.backpressure),
            sys_interval: AtomicU64::new(config.sys_topics.interval.as_secs()),
            config,
            metrics,
            store,
            subscriptions: RwLock::new(Trie::new()),
            retained: RwLock::new(RetainTree::default()),
            next_message_id: AtomicU64::new(1),
            next_connection_id: AtomicU64::new(1),
        }
    }

    /// The limits now in force.
    pub fn limits(&self) -> Arc<Limits> {
        self.limits
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the limits (reload): broker-wide ones apply now, per-connection and
    /// per-session ones to connections and sessions made from now on.
    pub fn set_limits(&self, limits: Limits) {
        self.registry
            .set_queue_limits(limits.max_queued_messages, limits.max_queued_bytes);
        self.backpressure
            .store(limits.backpressure, Ordering::Relaxed);
        *self.limits.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(limits);
    }

    pub fn sys_interval(&self) -> u64 {
        self.sys_interval.load(Ordering::Relaxed)
    }

    pub fn set_sys_interval(&self, seconds: u64) {
        self.sys_interval.store(seconds, Ordering::Relaxed);
    }

    /// Message ids continue above what the store has used.
    pub fn set_next_message_id(&self, next: u64) {
        self.next_message_id.fetch_max(next, Ordering::Relaxed);
    }

    /// Puts a retained message recovered from the store back into the tree.
    pub fn restore_retained(&self, msg: Arc<Message>) {
        self.retained
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .store(msg, usize::MAX);
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
    /// RETAIN flag is set. `scratch` is the caller's reused buffer. With durable storage,
    /// what must be stored before the message may be acknowledged (the message, its place in
    /// persistent sessions' queues, the retained slot) is added to `staged`, and deliveries to
    /// persistent sessions wait there until that commit completes.
    pub fn publish(
        &self,
        msg: &Arc<Message>,
        scratch: &mut Vec<Subscriber>,
        staged: &mut Staged,
    ) -> Routed {
        // `$` topics are the broker's own (`$SYS`): only the broker publishes them (clients
        // may not, wills may not), they describe this run, and they are never persisted.
        let durable = self.store.durable() && !msg.topic.as_str().starts_with('$');
        self.topic_sampler.record(msg.id, msg.topic.as_str());
        let mut message_staged = false;
        let mut stage_message = |ops: &mut Vec<Op>| {
            if !message_staged {
                message_staged = true;
                ops.push(Op::PutMessage(StoredMessage::from_message(
                    msg,
                    crate::clock::now(),
                    unix_now_ms(),
                )));
            }
        };
        if msg.retain && self.config.mqtt.retain_available {
            let outcome = self
                .retained
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .store(msg.clone(), self.limits().max_retained_messages);
            match outcome {
                RetainOutcome::Full => self.metrics.dropped_retain_full.inc(),
                RetainOutcome::Deleted if durable => staged.ops.push(Op::DeleteRetained {
                    topic: msg.topic.to_string(),
                }),
                RetainOutcome::Stored | RetainOutcome::Replaced if durable => {
                    stage_message(&mut staged.ops);
                    staged.ops.push(Op::PutRetained {
                        topic: msg.topic.to_string(),
                        msg_id: msg.id,
                    });
                }
                _ => {}
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
            let group = scratch[i].group.as_ref();
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
            // A group's message is authorised per member when the member's connection takes
            // it (each member has its own identity; see `Client::fill_from_outbox`).
            let allowed = if group.is_some() {
                true
            } else if rule.needs_username() {
                let user = session.username();
                rule.allows(user.as_deref(), &session.client_id)
            } else {
                rule.allows(None, &session.client_id)
            };
            if !allowed {
                self.metrics.dropped_not_authorized.inc();
                i = j;
                continue;
            }
            routed.matched += 1;
            // Live messages carry RETAIN=0 unless Retain As Published ([MQTT-3.3.1-12]
            // [MQTT-3.3.1-13]); a group keeps the flag and applies each member's option.
            let retain = msg.retain && (retain_as_published || group.is_some());
            let delivery = Delivery::new(msg.clone(), qos.min(msg.qos), retain, sub_ids);
            let mut queued = true;
            if durable
                && delivery.qos != QoS::AtMostOnce
                && session.persistent.load(Ordering::Relaxed)
            {
                let entry = QueueEntry {
                    msg_id: msg.id,
                    qos: delivery.qos,
                    retain: delivery.retain,
                    sub_ids: delivery.sub_ids.as_slice().to_vec(),
                };
                let reservation = session.outbox.reserve(msg.weight());
                match reservation {
                    Reservation::Full => {
                        self.metrics.dropped_queue_full.inc();
                        queued = false;
                    }
                    Reservation::Hot { seq, .. } | Reservation::Spill { seq, .. } => {
                        stage_message(&mut staged.ops);
                        staged.ops.push(Op::Enqueue {
                            session_id: session.id,
                            seq,
                            entry,
                        });
                        staged.after.extend(After::reserved(
                            session.clone(),
                            reservation,
                            delivery,
                        ));
                    }
                }
            } else {
                queued = self.push(session, delivery) != Pushed::DroppedFull;
            }
            if !queued {
                routed.dropped += 1;
                if let Some(g) = group {
                    g.metrics.dropped.inc();
                }
            } else if routed.pressure.is_none()
                && (match group {
                    Some(_) => self.config.shared.backpressure,
                    None => self.backpressure.load(Ordering::Relaxed),
                })
                && session.outbox.drained_and_above(3, 4)
                // A publisher that drains the queue itself must not stop reading its acks.
                && match group {
                    Some(g) => !g.is_member(msg.origin),
                    None => session.id != msg.origin,
                }
            {
                routed.pressure = Some(session.clone());
            }
            i = j;
        }
        if routed.matched == 0 && !msg.retain {
            self.metrics.dropped_no_subscribers.inc();
        }
        routed
    }

    /// Routes a message nobody acknowledges (a will): what it staged is committed in the
    /// background and its durable deliveries become visible when that completes.
    pub fn publish_detached(self: &Arc<Self>, msg: &Arc<Message>) {
        let mut scratch = Vec::new();
        let mut staged = Staged::default();
        self.publish(msg, &mut scratch, &mut staged);
        self.commit_detached(staged);
    }

    /// Submits `staged`: the store makes its deliveries visible once the commit is durable,
    /// or releases their places (counted as `storage_failed`) if it fails — whether or not the
    /// submitter is still there. The returned commit only gates the submitter's own
    /// acknowledgement.
    pub fn submit_staged(&self, staged: Staged) -> Commit {
        if staged.ops.is_empty() {
            // Nothing to store: nothing was reserved either (reservations come with ops).
            for a in staged.after {
                a.durable();
            }
            return Commit::Done;
        }
        let then = if staged.after.is_empty() {
            OnCommit::none()
        } else {
            let lost = self.metrics.dropped_storage_failed.clone();
            let after = staged.after;
            OnCommit::new(move |outcome| match outcome {
                Outcome::Durable => after.into_iter().for_each(After::durable),
                Outcome::Failed => {
                    let n = after
                        .into_iter()
                        .filter_map(|mut a| a.release().then_some(()))
                        .count();
                    lost.inc_by(n as u64);
                }
            })
        };
        self.store.submit_then(staged.ops, then)
    }

    /// Submits `staged` for nobody's acknowledgement (QoS 0 retained updates, wills, group
    /// hand-backs); its effects are the store's, as with [`Broker::submit_staged`].
    pub fn commit_detached(&self, staged: Staged) {
        let _ = self.submit_staged(staged);
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
            if b.store.durable() && b.registry.is_detached(&record.client_id, record.session_id) {
                record.will = None;
                let _ = b.store.submit(vec![Op::PutSession(record)]);
            }
        })
        .abort_handle()
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
                    group: None,
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
        let now = crate::clock::now();
        out.retain(|m| !m.is_expired(now));
    }

    /// Removes every subscription of an ended session and empties its queue.
    pub fn end_session(self: &Arc<Self>, handle: &SessionHandle, state: &mut SessionState) {
        // Shared subscription groups first: what goes back to them is submitted before the
        // session's deletion drops its in-flight records.
        self.shared_member_gone(handle, state, true);
        if self.store.durable() && handle.persistent.swap(false, Ordering::Relaxed) {
            // Fire and forget: nothing is acknowledged on the strength of a deletion, and the
            // storage thread applies it before anything submitted later.
            let _ = self.store.submit(vec![Op::DeleteSession {
                client_id: handle.client_id.to_string(),
                session_id: handle.id,
            }]);
        }
        if !state.subscriptions.is_empty() {
            let mut subs = self
                .subscriptions
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for filter in state.subscriptions.keys() {
                if shared::parse(filter).is_none() {
                    subs.unsubscribe(filter, handle.id);
                }
            }
        }
        state.clear();
        handle.outbox.clear();
    }

    /// Joins (or updates) `session`'s membership of shared subscription `share`/`filter`.
    /// `window` is the member connection's in-flight window (`online` false: restored while
    /// its client is away).
    #[allow(clippy::too_many_arguments)]
    pub fn subscribe_shared(
        self: &Arc<Self>,
        session: &Arc<SessionHandle>,
        share: &str,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
        online: bool,
        window: usize,
    ) -> Arc<Group> {
        let key = format!("$share/{share}/{filter}");
        let (group, created) = self.groups.join(
            &key,
            || self.make_group(share, filter, None),
            |g| g.join(session, options, id, online, window),
        );
        if self.store.durable()
            && session.persistent.load(Ordering::Relaxed)
            && !group.queue.persistent.swap(true, Ordering::Relaxed)
        {
            // Stored before anything is queued for it (the store keeps submission order).
            let _ = self.store.submit(vec![Op::PutSession(SessionRecord {
                client_id: group.queue.client_id.to_string(),
                session_id: group.queue.id,
                expiry_interval: u32::MAX,
                disconnected_at_ms: None,
                will: None,
                username: None,
            })]);
        }
        self.index_group(&group);
        if created {
            tokio::spawn(group.clone().run(Arc::downgrade(self)));
        }
        group
    }

    /// Makes a group (`restored`: its storage id and queue recovered from the store).
    pub(crate) fn make_group(
        &self,
        share: &str,
        filter: &str,
        restored: Option<u64>,
    ) -> Arc<Group> {
        let shared = &self.config.shared;
        let key = format!("$share/{share}/{filter}");
        let id = restored.unwrap_or_else(|| self.registry.allocate_id());
        let queue = Arc::new(SessionHandle::new(
            id,
            Arc::from(shared::record_key(&key)),
            Outbox::new(shared.max_queued_messages, shared.max_queued_bytes),
            restored.is_some(),
        ));
        let metrics = self.metrics.group_metrics(share, filter);
        Arc::new(Group::new(
            share,
            filter,
            shared.strategy_of(share),
            queue,
            metrics,
        ))
    }

    /// (Re)writes a group's entry in the subscription index: one entry per group, at the
    /// highest QoS any member asked for.
    fn index_group(&self, group: &Arc<Group>) {
        let options = SubscriptionOptions {
            qos: group.max_qos(),
            ..SubscriptionOptions::default()
        };
        self.subscriptions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .subscribe(
                &group.filter,
                group.queue.id,
                Subscriber {
                    session: group.queue.clone(),
                    options,
                    id: None,
                    group: Some(group.clone()),
                },
            );
    }

    /// `session` leaves the group `key` (`$share/NAME/FILTER`); true if it was a member.
    pub fn unsubscribe_shared(&self, session: &SessionHandle, key: &str) -> bool {
        let Some(group) = self.groups.get(key) else {
            return false;
        };
        let was = group.is_member(session.id);
        if group.leave(session.id) {
            self.drop_group(&group);
        } else {
            self.index_group(&group);
        }
        was
    }

    /// Removes a group nobody belongs to any more; what it still queued is discarded.
    pub(crate) fn drop_group(&self, group: &Arc<Group>) {
        if !self.groups.remove_if_empty(group) {
            return;
        }
        self.subscriptions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .unsubscribe(&group.filter, group.queue.id);
        let discarded = group.queue.outbox.clear();
        if discarded > 0 {
            self.metrics.dropped_no_subscribers.inc_by(discarded as u64);
        }
        if self.store.durable() && group.queue.persistent.load(Ordering::Relaxed) {
            let _ = self.store.submit(vec![Op::DeleteSession {
                client_id: group.queue.client_id.to_string(),
                session_id: group.queue.id,
            }]);
        }
        self.metrics.forget_group(&group.share, &group.filter);
        tracing::debug!(group = %group.key(), "shared subscription group ended");
    }

    /// A member's connection left (`ended`: its session ended too). Its lanes go back to its
    /// groups and so do the deliveries it had not finished (see [`shared`] for which).
    pub fn shared_member_gone(
        self: &Arc<Self>,
        handle: &SessionHandle,
        state: &mut SessionState,
        ended: bool,
    ) {
        let mut emptied = Vec::new();
        for filter in state.subscriptions.keys() {
            if shared::parse(filter).is_none() {
                continue;
            }
            let Some(group) = self.groups.get(filter) else {
                continue;
            };
            if !ended {
                group.set_online(handle.id, false, 0);
            } else if group.leave(handle.id) {
                emptied.push(group);
            } else {
                self.index_group(&group);
            }
        }
        let taken = state.inflight.take_where(|o| match o {
            Outbound::Published(d) => d.group.is_some() && (ended || d.qos == QoS::AtLeastOnce),
            Outbound::Released(d) => ended && d.group.is_some(),
        });
        let mut staged = Staged::default();
        for (packet_id, o) in taken {
            let (Outbound::Published(d) | Outbound::Released(d)) = &o;
            let Some(group) = d.group.clone() else {
                continue;
            };
            group.release(handle.id);
            if matches!(o, Outbound::Released(_)) || group.is_closed() {
                continue;
            }
            if d.stored && self.store.durable() {
                shared::give_back_stored(&group, handle.id, packet_id, d, &mut staged);
            } else {
                group.take_back(vec![d.clone()]);
            }
        }
        self.commit_detached(staged);
        for group in emptied {
            self.drop_group(&group);
        }
    }

    /// Moves the next committed entries of `handle`'s on-disk queue into memory; returns
    /// whether anything was loaded. Dangling entries (their message is gone) are dequeued
    /// through `ops`. Synchronous: fjall reads are mostly served from its memtable and cache.
    pub fn load_spilled(&self, handle: &SessionHandle, ops: &mut Vec<Op>) -> bool {
        const LOAD_BATCH: usize = 256;
        if !self.store.durable() {
            return false;
        }
        let Some((from, below, epoch)) = handle.outbox.spill_window() else {
            return false;
        };
        let entries = match self.store.read_queue(handle.id, from, LOAD_BATCH) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(client_id = %handle.client_id, error = %e, "cannot read the session queue");
                return false;
            }
        };
        let full = entries.len() == LOAD_BATCH;
        let now = crate::clock::now();
        let unix = unix_now_ms();
        let mut loaded = Vec::with_capacity(entries.len());
        let mut missing = 0;
        let mut next_from = below;
        for (seq, e) in entries {
            if seq >= below {
                break;
            }
            next_from = seq + 1;
            match self.store.get_message(e.msg_id) {
                Ok(Some(m)) => {
                    let mut sub_ids = SubIds::None;
                    for id in e.sub_ids {
                        sub_ids.push(id);
                    }
                    let mut d =
                        Delivery::new(Arc::new(m.to_message(now, unix)), e.qos, e.retain, sub_ids);
                    d.seq = Some(seq);
                    d.stored = true;
                    loaded.push(d);
                }
                _ => {
                    missing += 1;
                    ops.push(Op::Dequeue {
                        session_id: handle.id,
                        seq,
                    });
                }
            }
        }
        if !full {
            next_from = below;
        }
        let any = !loaded.is_empty();
        handle.outbox.load_spilled(loaded, next_from, epoch);
        if missing > 0 {
            handle.outbox.forget_spilled(missing);
        }
        any
    }

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
        });
        self.publish_detached(&msg);
    }

    /// Ends sessions whose expiry passed while their client was away, and retained messages
    /// whose Message Expiry passed. Runs once a second until the broker stops.
    pub async fn run_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweeps: u64 = 0;
        let mut drops = DropLog::default();
        loop {
            tick.tick().await;
            let now = crate::clock::now();
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
            sweeps += 1;
            if sweeps.is_multiple_of(10) {
                if self.store.durable() {
                    self.sweep_expired_queues();
                }
                drops.report(&self);
            }
        }
    }

    /// Message expiry on stored data: drops expired messages from the head of the on-disk
    /// queues of sessions whose client is away, so their disk space returns without waiting
    /// for the client (queues are FIFO, so expired messages gather at the head).
    fn sweep_expired_queues(&self) {
        const SWEEP_BATCH: usize = 256;
        let unix = unix_now_ms();
        for handle in self.registry.detached() {
            let Some((from, below, epoch)) = handle.outbox.spill_head() else {
                continue;
            };
            let Ok(entries) = self.store.read_queue(handle.id, from, SWEEP_BATCH) else {
                continue;
            };
            let mut ops = Vec::new();
            let mut bytes = 0;
            let mut next_from = from;
            for (seq, e) in entries {
                if seq >= below {
                    break;
                }
                let expired = match self.store.get_message(e.msg_id) {
                    Ok(Some(m)) => match m.expires_at_ms {
                        Some(at) if at <= unix => {
                            bytes += m.weight() as usize;
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                };
                if !expired {
                    break;
                }
                ops.push(Op::Dequeue {
                    session_id: handle.id,
                    seq,
                });
                next_from = seq + 1;
            }
            let n = ops.len();
            if n > 0
                && handle
                    .outbox
                    .drop_spilled_head(from, next_from, n, bytes, epoch)
            {
                let _ = self.store.submit(ops);
                self.metrics.dropped_expired.inc_by(n as u64);
            }
        }
    }
}
