//! The durable routing step. With durable storage a QoS 1/2 delivery to a persistent queue
//! (a session's or a shared group's) may not be seen before it is stored: the publisher is
//! acknowledged only after the commit, and a subscriber must never get a message that a crash
//! could make the broker forget. So routing *reserves* the delivery's place in the queue and
//! stages the store operations; the store makes the delivery visible when the commit is
//! durable, or gives the place back when it fails, whoever submitted it ([`After`]).
//! Everything else (QoS 0, clean sessions, memory storage) is pushed at once.

use super::shared::{Group, Kind};
use super::Broker;
use crate::message::Message;
use crate::outbox::{Delivery, Pushed, Reservation};
use crate::protocol::QoS;
use crate::session::registry::SessionHandle;
use crate::storage::record::{unix_now_ms, QueueEntry, StoredMessage};
use crate::storage::{Commit, OnCommit, Op, Outcome};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a publish leaves for its commit: the operations to store, and deliveries that become
/// visible once they are stored.
#[derive(Default)]
pub struct Staged {
    pub ops: Vec<Op>,
    pub after: Vec<After>,
    /// Messages whose `PutMessage` is among `ops` (a message is put once per commit: the
    /// store counts its references from its put).
    put: Vec<u64>,
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
    /// Lives on disk only; the session's connection loads it once committed. The message
    /// and QoS stay for a trace's "queued" event (`trace.rs`) until then.
    Spilled {
        seq: u64,
        weight: usize,
        msg: Arc<Message>,
        qos: QoS,
    },
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
                    qos: delivery.qos,
                    msg: delivery.msg,
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
            Some(Reserved::Spilled { seq, weight, .. }) => {
                self.session.outbox.release_spilled(seq, weight, self.epoch)
            }
            None => false,
        }
    }

    /// The queue, message and QoS of a pending delivery, for a trace (`trace.rs`).
    pub(super) fn traced(&self) -> Option<(&Arc<SessionHandle>, &Arc<Message>, QoS)> {
        match self.reserved.as_ref()? {
            Reserved::Hot(d) => Some((&self.session, &d.msg, d.qos)),
            Reserved::Spilled { msg, qos, .. } => Some((&self.session, msg, *qos)),
        }
    }
}

impl Drop for After {
    fn drop(&mut self) {
        self.release();
    }
}

/// One message's part of a [`Staged`]: the message itself is stored at most once, however
/// many queues and the retained slot refer to it.
pub(super) struct Staging<'a> {
    msg: &'a Arc<Message>,
    staged: &'a mut Staged,
    message_staged: bool,
}

impl<'a> Staging<'a> {
    pub(super) fn new(msg: &'a Arc<Message>, staged: &'a mut Staged) -> Self {
        // Staged already when a batch's routing and its early deliveries (`early.rs`) both
        // refer to it.
        let message_staged = staged.put.contains(&msg.id);
        Staging {
            msg,
            staged,
            message_staged,
        }
    }

    /// Stages `op`, which refers to the message: the message goes first, once.
    pub(super) fn op(&mut self, op: Op) {
        if !self.message_staged {
            self.message_staged = true;
            self.staged.put.push(self.msg.id);
            self.staged
                .ops
                .push(Op::PutMessage(StoredMessage::from_message(
                    self.msg,
                    crate::clock::now(),
                    unix_now_ms(),
                )));
        }
        self.staged.ops.push(op);
    }

    /// Stages an op that does not refer to the message (a retained deletion).
    pub(super) fn op_alone(&mut self, op: Op) {
        self.staged.ops.push(op);
    }
}

impl Broker {
    /// Puts one delivery into `session`'s queue; false when the queue is full (counted).
    /// `staging` is given when the message is durable: a QoS 1/2 delivery to a persistent
    /// queue then reserves its place and waits for the commit instead of being pushed.
    pub(super) fn deliver(
        &self,
        session: &Arc<SessionHandle>,
        delivery: Delivery,
        staging: Option<&mut Staging<'_>>,
    ) -> bool {
        self.deliver_with(session, delivery, staging, false)
    }

    /// Puts one delivery into a group's queue, as [`Broker::deliver`]; but a declared queue
    /// that drops its oldest (`overflow = "drop_oldest"`) takes it even when full, and its
    /// dispatcher then trims the head to the limits (counted there as `overflow`).
    pub(super) fn deliver_to_group(
        &self,
        group: &Arc<Group>,
        delivery: Delivery,
        staging: Option<&mut Staging<'_>>,
    ) -> bool {
        if group.kind != Kind::Queue || !group.drops_oldest() {
            return self.deliver(&group.queue, delivery, staging);
        }
        let stored = staging.is_some()
            && delivery.qos != QoS::AtMostOnce
            && group.queue.persistent.load(Ordering::Relaxed);
        if !stored {
            // In memory the head goes at once.
            let n = if self.tracer.active() {
                self.tracer.push_evicting(&group.queue, delivery)
            } else {
                group.queue.outbox.push_evicting(delivery).len()
            } as u64;
            group.metrics.evicted(n);
            self.metrics.dropped_overflow.inc_by(n);
            return true;
        }
        let taken = self.deliver_with(&group.queue, delivery, staging, true);
        group.poke();
        taken
    }

    /// [`Broker::deliver`]; `evict`: a full queue takes it all the same (its oldest go).
    fn deliver_with(
        &self,
        session: &Arc<SessionHandle>,
        delivery: Delivery,
        staging: Option<&mut Staging<'_>>,
        evict: bool,
    ) -> bool {
        let staging = match staging {
            Some(s)
                if delivery.qos != QoS::AtMostOnce
                    && session.persistent.load(Ordering::Relaxed) =>
            {
                s
            }
            _ => return self.push(session, delivery) != Pushed::DroppedFull,
        };
        let reservation =
            session
                .outbox
                .reserve_with(delivery.msg.weight(), evict, delivery.enqueued);
        let (Reservation::Hot { seq, .. } | Reservation::Spill { seq, .. }) = reservation else {
            self.metrics.dropped_queue_full.inc();
            if self.tracer.active() {
                self.tracer
                    .dropped_at(&delivery.msg, session, super::trace::Reason::QueueFull);
            }
            return false;
        };
        staging.op(Op::Enqueue {
            session_id: session.id,
            seq,
            entry: QueueEntry {
                msg_id: delivery.msg.id,
                qos: delivery.qos,
                retain: delivery.retain,
                sub_ids: delivery.sub_ids.as_slice().to_vec(),
                enqueued: delivery.enqueued,
            },
        });
        staging
            .staged
            .after
            .extend(After::reserved(session.clone(), reservation, delivery));
        true
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
        // A trace reports the commit's stored and queued steps when it completes.
        let watch = if self.tracer.active() {
            self.tracer.watch(&staged.put)
        } else {
            None
        };
        let then = if staged.after.is_empty() && watch.is_none() {
            OnCommit::none()
        } else {
            let lost = self.metrics.dropped_storage_failed.clone();
            let after = staged.after;
            OnCommit::new(move |outcome| match outcome {
                Outcome::Durable => match watch {
                    Some(w) => w.durable(after),
                    None => after.into_iter().for_each(After::durable),
                },
                Outcome::Failed => {
                    if let Some(w) = &watch {
                        w.failed(&after);
                    }
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
}
