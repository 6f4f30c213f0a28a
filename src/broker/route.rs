//! Routing one message: the retained slot, the subscriptions that match, and one delivery
//! per receiving session (or shared subscription group) into its queue.

use super::early::{Early, FastRouted};
use super::retain::RetainOutcome;
use super::shared::Group;
use super::staged::Staging;
use super::trace::Reason;
use super::{Broker, Staged, Subscriber};
use crate::message::Message;
use crate::outbox::{Delivery, SubIds};
use crate::session::registry::SessionHandle;
use crate::storage::record::unix_now_ms;
use crate::storage::Op;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

/// Which of the matching sessions a routing reaches. On a single node always all of them.
/// In a cluster, QoS 1/2 deliveries to persistent sessions are made in the order of the
/// cluster's messages stream, by the node's consumer, whoever published (so a session's
/// queue has one well-defined position in that stream, which lets it move between nodes
/// without a gap or a double, `cluster/sessions.rs`); the publishing node reaches the others
/// at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targets {
    All,
    /// All but persistent sessions (a message published here, in a cluster).
    NotPersistent,
    /// All, persistent sessions only where they can take it before it is stored (another
    /// node's fast copy, `early.rs`); the others get it from the stream.
    Fast,
    /// Persistent sessions only (a message published here, back from the stream).
    PersistentOnly,
    /// One session (catching a session up on what it missed while it moved).
    Session(u64),
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
    /// Deliveries to persistent sessions made before the message was stored, and those
    /// that could not take one ([`Targets::Fast`]).
    pub fast: FastRouted,
}

impl Broker {
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
        let targets = if self.peers.get().is_some()
            && msg.qos != crate::protocol::QoS::AtMostOnce
            && !msg.topic.as_str().starts_with('$')
        {
            Targets::NotPersistent
        } else {
            Targets::All
        };
        self.route(msg, scratch, staged, true, targets, &[])
    }

    /// [`Broker::publish`]; `retain_slot` false leaves the retained slot alone (a message
    /// from another node, whose retained state comes through the cluster's retained stream).
    /// `early`: ids of the sessions that had it before it was stored (sorted), skipped here.
    pub(super) fn route(
        &self,
        msg: &Arc<Message>,
        scratch: &mut Vec<Subscriber>,
        staged: &mut Staged,
        retain_slot: bool,
        targets: Targets,
        early: &[u64],
    ) -> Routed {
        // `$` topics are the broker's own (`$SYS`): only the broker publishes them (clients
        // may not, wills may not), they describe this run, and they are never persisted.
        let durable = self.store.durable() && !msg.topic.as_str().starts_with('$');
        let mut staging = durable.then(|| Staging::new(msg, staged));
        self.topic_sampler.record(msg.id, msg.topic.as_str());
        if retain_slot && msg.retain && self.config.mqtt.retain_available {
            self.retain(msg, staging.as_mut());
        }
        self.match_into(msg, scratch);
        if self.tracer.active() {
            self.tracer.matched(msg, scratch);
        }
        let mut routed = Routed::default();
        let rule = self.auth.receive_rule(msg.topic.as_str());
        let mut enqueued: Option<u32> = None;
        let mut i = 0;
        while i < scratch.len() {
            // Overlapping subscriptions of one session: one copy at the highest QoS, with every
            // matching subscription identifier ([MQTT-3.3.4-2] .. [MQTT-3.3.4-5]).
            let session = &scratch[i].session;
            let group = scratch[i].group.as_ref();
            if group.is_some_and(|g| !g.takes(msg.qos)) {
                // A declared queue keeps QoS 1/2 messages only.
                i += 1;
                continue;
            }
            if group.is_some() && self.peers.get().is_some() {
                // In a cluster a group's messages come from its JetStream consumer or its
                // NATS queue group, one node per message (`Broker::publish_to_group`).
                i += 1;
                continue;
            }
            if targets != Targets::All {
                let persistent = session.persistent.load(Ordering::Relaxed);
                let skip = match targets {
                    Targets::All => false,
                    // Shared groups take a cluster's messages from their own consumers (and
                    // are skipped above in a cluster); a fast copy never reaches them.
                    Targets::Fast => group.is_some(),
                    Targets::NotPersistent => persistent,
                    Targets::PersistentOnly => {
                        !persistent || early.binary_search(&session.id).is_ok()
                    }
                    Targets::Session(id) => session.id != id,
                };
                if skip {
                    // Skipped here, reached in the other pass: still a match.
                    routed.matched += 1;
                    let id = session.id;
                    while i < scratch.len() && scratch[i].session.id == id {
                        i += 1;
                    }
                    continue;
                }
            }
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
            i = j;
            // A group's message is authorised per member when the member's connection takes
            // it (each member has its own identity; see `Client::fill_from_outbox`).
            let allowed = group.is_some()
                || if rule.needs_username() {
                    rule.allows(session.username().as_deref(), &session.client_id)
                } else {
                    rule.allows(None, &session.client_id)
                };
            if !allowed {
                self.metrics.dropped_not_authorized.inc();
                if self.tracer.active() {
                    self.tracer.dropped_at(msg, session, Reason::NotAuthorized);
                }
                continue;
            }
            routed.matched += 1;
            // Live messages carry RETAIN=0 unless Retain As Published ([MQTT-3.3.1-12]
            // [MQTT-3.3.1-13]); a group keeps the flag and applies each member's option.
            let retain = msg.retain && (retain_as_published || group.is_some());
            let mut delivery = Delivery::new(msg.clone(), qos.min(msg.qos), retain, sub_ids);
            // A declared queue's (or bridge's) time to live, and every queue's oldest age
            // (consumer lag: sessions and groups alike), count from now; one clock read per
            // message. Only routed deliveries carry it, so a retained message sent on
            // subscribe (0) never counts as lag.
            delivery.enqueued =
                *enqueued.get_or_insert_with(|| (unix_now_ms() / 1000).min(u32::MAX.into()) as u32);
            if targets == Targets::Fast && session.persistent.load(Ordering::Relaxed) {
                // When it cannot take it now, it gets it from the stream like any message of
                // a persistent session (still a match).
                self.deliver_early(session, delivery, durable, &mut routed.fast);
                continue;
            }
            let taken = match group {
                Some(g) => self.deliver_to_group(g, delivery, staging.as_mut()),
                None => self.deliver(session, delivery, staging.as_mut()),
            };
            if !taken {
                routed.dropped += 1;
                if let Some(g) = group {
                    g.metrics.dropped.inc();
                }
            } else if routed.pressure.is_none() && self.presses_back(session, group, msg.origin) {
                routed.pressure = Some(session.clone());
            }
        }
        // Counted once per message and node: in a cluster a message is routed in two passes
        // (`Targets`), and the second (persistent sessions, or one session catching up) has
        // nothing to add.
        let second_pass = matches!(targets, Targets::PersistentOnly | Targets::Session(_));
        if routed.matched == 0 && !msg.retain && !second_pass {
            self.metrics.dropped_no_subscribers.inc();
            if self.tracer.active() {
                let topic = msg.topic.as_str();
                self.tracer
                    .dropped(msg.id, topic, None, Reason::NoSubscribers);
            }
        }
        routed
    }

    /// Hands a QoS 1 delivery to a persistent session before its message is stored, when the
    /// session can take it now (`early.rs`, [`crate::outbox::Outbox::push_early`]).
    /// A delivery granted at QoS 0 is left to the stream copy too (nothing to gain: the
    /// stream copy does not store it either).
    fn deliver_early(
        &self,
        session: &Arc<SessionHandle>,
        delivery: Delivery,
        durable: bool,
        out: &mut FastRouted,
    ) {
        if delivery.qos != crate::protocol::QoS::AtLeastOnce {
            return;
        }
        let (qos, retain, sub_ids) = (delivery.qos, delivery.retain, delivery.sub_ids.clone());
        let now = crate::clock::now();
        let settled = self.early.settled();
        let pushed = session
            .outbox
            .push_early(delivery, durable, settled, |seq| {
                self.early.delivered(session.id, seq, now)
            });
        match pushed {
            Ok((seq, epoch)) => {
                self.metrics.cluster.early.inc();
                out.early.push(Early {
                    session: session.clone(),
                    seq,
                    epoch,
                    qos,
                    retain,
                    sub_ids,
                })
            }
            Err(epoch) => out.refused.push((session.clone(), epoch)),
        }
    }

    /// Updates the retained slot of `msg`'s topic, staging the change when durable.
    fn retain(&self, msg: &Arc<Message>, staging: Option<&mut Staging<'_>>) {
        let outcome = self
            .retained
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .store(msg.clone(), self.limits().max_retained_messages);
        match (outcome, staging) {
            (RetainOutcome::Full, _) => {
                self.metrics.dropped_retain_full.inc();
                if self.tracer.active() {
                    let topic = msg.topic.as_str();
                    self.tracer
                        .dropped(msg.id, topic, None, Reason::RetainedFull);
                }
            }
            (RetainOutcome::Deleted, Some(s)) => s.op_alone(Op::DeleteRetained {
                topic: msg.topic.to_string(),
            }),
            (RetainOutcome::Stored | RetainOutcome::Replaced, Some(s)) => s.op(Op::PutRetained {
                topic: msg.topic.to_string(),
                msg_id: msg.id,
            }),
            _ => {}
        }
    }

    /// Updates the retained slot of `msg`'s topic alone (no routing), staging the change in
    /// `staged` when the store is durable.
    pub(super) fn retain_staged(&self, msg: &Arc<Message>, staged: &mut Staged) {
        if !self.config.mqtt.retain_available {
            return;
        }
        if self.store.durable() {
            let mut staging = Staging::new(msg, staged);
            self.retain(msg, Some(&mut staging));
        } else {
            self.retain(msg, None);
        }
    }

    /// The subscriptions matching `msg`'s topic into `scratch`, sorted so that one session's
    /// entries are adjacent, without those No Local excludes.
    fn match_into(&self, msg: &Message, scratch: &mut Vec<Subscriber>) {
        scratch.clear();
        let lists = self
            .subscriptions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .match_into(msg.topic.as_str(), scratch);
        // No Local: a subscription with it set does not match its own session's messages
        // ([MQTT-3.8.3-3]); a bridge's queue, the messages its bridge brought in.
        scratch.retain(|s| {
            !(s.options.no_local
                && s.group.as_ref().map_or(s.session.id, |g| g.origin) == msg.origin)
        });
        // Entries of one filter are unique per session; only several filters can overlap.
        if lists > 1 && scratch.len() > 1 {
            scratch.sort_unstable_by_key(|s| s.session.id);
        }
    }

    /// Whether the queue a message just went into is over the back-pressure threshold
    /// (`shared.backpressure`, `limits.backpressure`), so its publisher should pause. A
    /// publisher that drains the queue itself must not stop reading its acks.
    fn presses_back(
        &self,
        session: &SessionHandle,
        group: Option<&Arc<Group>>,
        origin: u64,
    ) -> bool {
        let enabled = match group {
            Some(_) => self.config.shared.backpressure,
            None => self.backpressure.load(Ordering::Relaxed),
        };
        enabled
            && session.outbox.drained_and_above(3, 4)
            && match group {
                Some(g) => !g.is_member(origin),
                None => session.id != origin,
            }
    }

    /// Routes a message nobody acknowledges (a will): what it staged is committed in the
    /// background and its durable deliveries become visible when that completes.
    /// In a cluster it goes to the other nodes too.
    pub fn publish_detached(self: &Arc<Self>, msg: &Arc<Message>) {
        let mut scratch = Vec::new();
        let mut staged = Staged::default();
        self.publish(msg, &mut scratch, &mut staged);
        let local = self.submit_staged(staged);
        let _ = self.forward(msg, local);
    }
}
