//! The other nodes of a cluster, as the broker sees them.
//!
//! The broker knows nothing of NATS: the cluster layer (`src/cluster/`) sits above it and
//! installs itself here as a [`Peers`] when the node joins. Through it the broker hands every
//! message a client (or a will) publishes on this node to the other nodes, and the cluster
//! hands messages from other nodes back through [`Broker::publish_remote`] and retained
//! updates through [`Broker::apply_retained`]. Without `[cluster]` nothing is installed and
//! every call here is a no-op, so a single node pays one `OnceLock` read per publish.

use super::early::{FastBatch, FastRouted, Pending};
use super::route::Targets;
use super::shared::Group;
use super::staged::Staging;
use super::{Broker, Staged};
use crate::message::Message;
use crate::outbox::{Delivery, SubIds};
use crate::protocol::Will;
use crate::session::registry::SessionHandle;
use crate::session::SessionState;
use crate::storage::record::SubscriptionRecord;
use crate::storage::record::{InflightRecord, QueueEntry};
use crate::storage::{Commit, Op};
use std::sync::Arc;

/// A boxed future, for the one async call of [`Peers`] (a trait object's methods cannot be
/// `async fn`).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What carries messages and client-id claims to the other nodes.
pub trait Peers: Send + Sync + 'static {
    /// This node's name in the cluster.
    fn node(&self) -> &str;
    /// `msg` was published on this node and routed to its own subscribers; `local` is the
    /// commit of this node's part. Returns the commit the publisher's acknowledgement waits
    /// for: for QoS 1/2, `local` and the cluster's replicated store of the message both.
    fn forward(&self, msg: &Arc<Message>, local: Commit) -> Commit;
    /// Connection `conn_id` of this node now holds `client_id`: connections holding it on
    /// other nodes are taken over. The CONNACK waits for the returned commit (the claim
    /// stored), so of two CONNECTs on two nodes the one answered later also claims later.
    fn claim(&self, client_id: &Arc<str>, conn_id: u64) -> Commit;
    /// Connection `conn_id` let go of `client_id`, and its node dealt with its will:
    /// published it, discarded it, or (`delayed`) waits for its Will Delay Interval.
    fn release(&self, client_id: &str, conn_id: u64, delayed: bool);
    /// This node published (or gave up) `client_id`'s delayed will.
    fn will_settled(&self, client_id: &str);
    /// A connection of `client_id` without a will connected here: a delayed will its client
    /// left (on any node) is cancelled ([MQTT-3.1.3-9]).
    fn will_cancelled(&self, client_id: &str);
    /// Connection `conn_id` of `client_id` has `will`: kept where a survivor finds it should
    /// this node die with the connection open. The CONNACK waits for the returned commit.
    fn store_will(&self, client_id: &str, conn_id: u64, will: &Will) -> Commit;
    /// A shared subscription group now has a member on this node: this node takes its share
    /// of the group's messages from the cluster (see [`Broker::publish_to_group`]).
    fn group_started(&self, group: &Arc<Group>);
    /// Done once this node takes its share of the group's messages (a group just started
    /// here needs its consumer and queue subscription first): a SUBACK waits for it.
    fn group_ready(&self, group: &Arc<Group>) -> Commit;
    /// The group has no member on this node any more.
    fn group_ended(&self, group: &Arc<Group>);
    /// A member here is finished with a group's message (`msg_id`, this node's id of it):
    /// acknowledged it, or was sent it at QoS 0. Until then the cluster keeps it for the
    /// group, so it goes to a member elsewhere should this node die.
    fn group_done(&self, msg_id: u64);
    /// Takes or keeps the lease of bridge `name` (a bridge runs on one node at a time):
    /// whether this node holds it now. Called again before a third of the lease's life.
    fn bridge_lease<'a>(&'a self, name: &'a str) -> BoxFuture<'a, bool>;
    /// This node stops running bridge `name`: its lease goes at once.
    fn bridge_released<'a>(&'a self, name: &'a str) -> BoxFuture<'a, ()>;
    /// Takes `client_id`'s persistent session from the node that has it, if another does,
    /// into `handle`'s (the connecting client's, new) session. `Some`: it did, and the commit
    /// is what the CONNACK with Session Present 1 waits for.
    fn take_session<'a>(
        &'a self,
        client_id: &'a str,
        handle: &'a Arc<SessionHandle>,
        state: &'a mut SessionState,
    ) -> BoxFuture<'a, Option<Commit>>;
    /// This node's position in the cluster's messages stream: every QoS 1/2 message up to it
    /// has been routed here (read before looking at a session's queue, see
    /// `SessionHandle::drained_at`).
    fn position(&self) -> u64;
    /// A persistent session's subscriptions changed: the SUBACK/UNSUBACK waits for the
    /// returned commit, which covers `local` and the cluster's copy of them.
    /// `drained`: a stream position up to which the session has nothing left, if known.
    fn store_subscriptions(
        &self,
        client_id: &Arc<str>,
        subs: Vec<SubscriptionRecord>,
        drained: Option<u64>,
        local: Commit,
    ) -> Commit;
    /// A persistent session of this node ended.
    fn session_ended(&self, client_id: &Arc<str>);
    /// At shutdown, once the connections are closed: waits (briefly) until what they left
    /// for the other nodes (wills, will copies to remove) has reached NATS.
    fn drain(&self) -> BoxFuture<'_, ()>;
    /// The nodes whose heartbeat is live, sorted (this one included while it reaches NATS).
    fn members(&self) -> Vec<String>;
    /// Whether the cluster can make durable promises now (its store has quorum). A
    /// CONNECT that asks for a persistent session is refused while it cannot.
    fn available(&self) -> bool;
}

impl Broker {
    /// Installs the cluster (once, at startup, before any listener opens).
    pub fn set_peers(&self, peers: Arc<dyn Peers>) {
        let _ = self.peers.set(peers);
    }

    pub fn peers(&self) -> Option<&Arc<dyn Peers>> {
        self.peers.get()
    }

    /// Hands a message published on this node to the other nodes (see [`Peers::forward`]).
    /// `$` topics are this node's own (`$SYS`) and stay here.
    pub fn forward(&self, msg: &Arc<Message>, local: Commit) -> Commit {
        match self.peers.get() {
            Some(p) if !msg.topic.as_str().starts_with('$') => p.forward(msg, local),
            _ => local,
        }
    }

    /// Routes messages from the cluster (one, or a batch of one topic's) to `targets` (all,
    /// for another node's message; the persistent sessions, for this node's own back from
    /// the stream), in order. Their retained slot is not touched here: retained state
    /// arrives in its own order through [`Broker::apply_retained`]. Returns the commit of
    /// what they stored for persistent sessions here, one for the whole batch; the caller
    /// acknowledges the batch to the cluster after it.
    pub fn publish_remote(&self, msgs: &[Arc<Message>], targets: Targets) -> Commit {
        let mut scratch = Vec::new();
        let mut staged = Staged::default();
        for msg in msgs {
            self.route(msg, &mut scratch, &mut staged, false, targets, &[]);
        }
        self.submit_staged(staged)
    }

    /// Routes another node's fast copy of a batch (`cluster/fast.rs`): to every clean
    /// session, and to the persistent sessions that can take it before it is stored
    /// (`early.rs`). Returns what its stream copy must settle
    /// ([`Broker::publish_stream_copy`], or [`Broker::forget_fast`] if it never comes).
    pub fn publish_fast(&self, msgs: &[Arc<Message>]) -> FastBatch {
        let number = self.early.fast_begin();
        let mut scratch = Vec::new();
        let mut staged = Staged::default();
        let routed = msgs
            .iter()
            .map(|msg| {
                self.route(msg, &mut scratch, &mut staged, false, Targets::Fast, &[])
                    .fast
            })
            .collect();
        // Nothing is stored for a fast copy: clean sessions keep nothing, and the early
        // deliveries are stored with the stream copy.
        debug_assert!(staged.is_empty());
        self.commit_detached(staged);
        FastBatch { number, routed }
    }

    /// A fast copy's stream copy is not coming (JetStream refused its publisher): what it
    /// holds back is let go.
    pub fn forget_fast(&self, batch: FastBatch) {
        batch.routed.iter().for_each(FastRouted::settle_refused);
        self.early.fast_end(batch.number);
    }

    /// Routes the stream copy of a batch whose fast copy came first to the persistent
    /// sessions, and stores the queue entries of the early deliveries `batch` made that are
    /// not acknowledged yet, in the same commit (`early.rs`).
    pub fn publish_stream_copy(&self, msgs: &[Arc<Message>], batch: FastBatch) -> Commit {
        let fast = &batch.routed;
        let mut scratch = Vec::new();
        let mut staged = Staged::default();
        let none = FastRouted::default();
        let mut skip = Vec::new();
        for (i, msg) in msgs.iter().enumerate() {
            let f = fast.get(i).unwrap_or(&none);
            skip.clear();
            skip.extend(f.early.iter().map(|e| e.session.id));
            skip.sort_unstable();
            self.route(
                msg,
                &mut scratch,
                &mut staged,
                false,
                Targets::PersistentOnly,
                &skip,
            );
        }
        // Queued (reserved) now for the sessions that refused the fast copy, or subscribed
        // after it: they may take early deliveries again, which cannot overtake these
        // reservations.
        fast.iter().for_each(FastRouted::settle_refused);
        self.early.fast_end(batch.number);
        if fast.iter().all(|f| f.early.is_empty()) {
            // No early delivery to settle (the usual case under load): no ledger.
            return self.submit_staged(staged);
        }
        let early: Vec<&Vec<_>> = fast.iter().map(|f| &f.early).collect();
        // Whether each session is still of the queue epoch its delivery was made in, read
        // before the ledger is locked (lock order: outbox, then ledger).
        let current: Vec<Vec<bool>> = early
            .iter()
            .map(|l| {
                l.iter()
                    .map(|e| e.session.outbox.epoch() == e.epoch)
                    .collect()
            })
            .collect();
        let mut taken = self.early.take();
        let mut store = Vec::new();
        for (i, msg) in msgs.iter().enumerate() {
            let (Some(list), Some(cur)) = (early.get(i), current.get(i)) else {
                continue;
            };
            for (e, &cur) in list.iter().zip(cur) {
                let Some(seq) = e.seq else {
                    continue;
                };
                let how = taken.pending(e, cur);
                let entry = QueueEntry {
                    msg_id: msg.id,
                    qos: e.qos,
                    retain: e.retain,
                    sub_ids: e.sub_ids.as_slice().to_vec(),
                    enqueued: 0,
                };
                let op = match how {
                    Pending::Nothing => continue,
                    Pending::Queue => Op::Enqueue {
                        session_id: e.session.id,
                        seq,
                        entry,
                    },
                    // Sent already: stored as in flight, so that a restart re-sends it in
                    // its original order among the others in flight.
                    Pending::InFlight { packet_id, order } => Op::PutInflight {
                        session_id: e.session.id,
                        rec: InflightRecord {
                            packet_id,
                            order,
                            entry,
                            released: false,
                            group: None,
                        },
                    },
                };
                Staging::new(msg, &mut staged).op(op);
                store.push((e, how, msg.id));
            }
        }
        // Submitted under the ledger's lock. The submit only hands the commit to the storage
        // thread, whose effects take outbox locks on that thread, never this one's (only a
        // store already shut down drops a request here, and with it its effects).
        let commit = self.submit_staged(staged);
        // Marked under the same lock as the submit: a PUBACK now dequeues after the insert.
        let now = crate::clock::now();
        for (e, how, msg_id) in store {
            taken.stored(e, how, msg_id, now);
        }
        commit
    }

    /// Queues a message the cluster gave this node for shared subscription group (or
    /// declared queue) `group` (each message of a group goes to one node, see
    /// `cluster/groups.rs`). `enqueued`: the Unix second it entered the cluster's stream (a
    /// declared queue's time to live counts from it). Returns the commit of the group's queue,
    /// or `None` when the queue is full (counted).
    pub fn publish_to_group(
        &self,
        group: &Arc<Group>,
        msg: &Arc<Message>,
        enqueued: u32,
    ) -> Option<Commit> {
        let mut staged = Staged::default();
        let durable = self.store.durable();
        let mut staging = durable.then(|| super::staged::Staging::new(msg, &mut staged));
        // A group keeps the RETAIN flag and applies each member's option when it hands the
        // message over, as in `route`.
        let mut delivery = Delivery::new(
            msg.clone(),
            group.index_qos().min(msg.qos),
            msg.retain,
            SubIds::None,
        );
        delivery.enqueued = enqueued;
        let accepted = self.deliver_to_group(group, delivery, staging.as_mut());
        if !accepted {
            group.metrics.dropped.inc();
            return None;
        }
        Some(self.submit_staged(staged))
    }

    /// Sets (or, for an empty payload, clears) the retained slot of `msg`'s topic from the
    /// cluster's retained stream, storing the change here too.
    pub fn apply_retained(&self, msg: &Arc<Message>) {
        let mut staged = Staged::default();
        self.retain_staged(msg, &mut staged);
        self.commit_detached(staged);
    }
}
