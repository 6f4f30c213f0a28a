//! Shared subscriptions (`$share/{ShareName}/{filter}`, MQTT 5 §4.8.2, also accepted from 3.1.1
//! clients): each message matching a group's filter goes to exactly one member of the group.
//!
//! A group is not a list of subscriptions the publisher picks from: it has **its own queue**
//! (an [`Outbox`](crate::outbox::Outbox) on a [`SessionHandle`] that no client owns, so it is
//! bounded, stored and recovered exactly like a persistent session's queue). Publishers push
//! into it like into any session. A small dispatcher task per group hands messages from that
//! queue to members that are connected **and have free in-flight credit**, into the member's
//! *lane*; the member's connection takes its lane when it fills its write buffer. A member that
//! is slow or stops acknowledging therefore holds at most its own window of messages, and the
//! rest keeps flowing to the others.
//!
//! When a member leaves (disconnect, unsubscribe, session end) whatever it held and had not
//! finished goes back to the group and is given to another member:
//! - its lane (assigned, not sent yet), always;
//! - QoS 1 sent but not acknowledged, always (at-least-once: the member may have seen it);
//! - QoS 2 sent but not PUBREC'd only when its session ends: while the session lives it is
//!   re-sent to the same member on return, which keeps exactly-once per group;
//! - QoS 2 after PUBREC stays (the member has it; only PUBREL/PUBCOMP remain).
//!
//! Durable groups: with durable storage a group's queue lives in the store under the group's
//! own session id, with a session record whose client id is `"\0$share/NAME/FILTER"` (a real
//! client id can never hold U+0000), so recovery finds it. A message handed to a persistent
//! member moves from the group's queue to the member's in-flight record in one commit, as for
//! its own queue; one handed to a non-persistent member stays in the group's queue until the
//! member acknowledges it (QoS 1) or PUBRECs it (QoS 2), so a crash redelivers it to the group.
//!
//! Declared queues (`[[queues]]`, `$queue/NAME`, docs/queues.md) are groups of another
//! [`Kind`]: made from the configuration rather than by a first member, collecting QoS 1/2
//! messages whether or not anyone consumes them, kept when their last consumer leaves, and with
//! a policy of their own (overflow, time to live) applied by the same dispatcher. Everything
//! else (credit, lanes, strategies, redelivery, storage, recovery) is the group's, unchanged.

mod membership;
mod queues;

pub use queues::QueueState;

use super::{After, Broker, Staged};
use crate::config::Strategy;
use crate::outbox::Reservation;
use crate::outbox::{Delivery, GroupId, Popped, SubIds};
use crate::protocol::{QoS, SubscriptionOptions};
use crate::session::registry::SessionHandle;
use crate::storage::record::QueueEntry;
use crate::storage::Op;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::Notify;

/// Prefix of the store's session record of a group (never a valid MQTT client id).
pub const RECORD_PREFIX: &str = "\0";

pub use crate::metrics::GroupMetrics;

struct Member {
    session: Arc<SessionHandle>,
    options: SubscriptionOptions,
    sub_id: Option<u32>,
    online: bool,
    /// The member connection's in-flight window.
    window: usize,
    /// Group messages given to it and not finished: in `lane` or in its in-flight window.
    outstanding: usize,
    /// Assigned to it, waiting for its connection to take them.
    lane: VecDeque<Delivery>,
}

impl Member {
    fn has_credit(&self) -> bool {
        self.online && self.outstanding < self.window
    }
}

struct Members {
    list: Vec<Member>,
    /// How a member is chosen (a declared queue's may change on reload).
    strategy: Strategy,
    /// Round robin position.
    cursor: usize,
    /// xorshift state for the random strategy.
    rng: u64,
}

/// What made a group, which decides its key and how long it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `$share/NAME/FILTER`: made by its first member, ended with its last.
    Shared,
    /// `$queue/NAME`: declared in the configuration; collects while declared, and lives on
    /// after its last consumer and after it is no longer declared, until it is empty.
    Queue,
    /// `$bridge/NAME`: a bridge's outgoing queue (`[[bridges]]`, `src/bridge`), declared
    /// like a queue, with the bridge's link as its one member. Clients cannot subscribe to it.
    Bridge,
}

/// A declared queue's policy, changed by a reload (atomics: read on every routing and
/// dispatch, without a lock).
#[derive(Default)]
struct Policy {
    /// Still declared: the queue collects (is in the subscription index).
    declared: AtomicBool,
    /// `overflow = "drop_oldest"`: a full queue takes a new message and drops its oldest.
    drop_oldest: AtomicBool,
    /// `message_ttl` in seconds; 0 = none.
    ttl_secs: AtomicU64,
}

/// One shared subscription group, or declared queue.
pub struct Group {
    /// The ShareName, or the declared queue's name.
    pub share: Arc<str>,
    /// What the group takes: one filter (a `$share` group, a declared queue), or a bridge's
    /// `out` filters.
    filters: Mutex<Vec<Arc<str>>>,
    pub kind: Kind,
    /// The origin of the messages that come in through this group (a bridge's, from its
    /// remote): No Local on the group's index entries keeps them out of it. The same on
    /// every node of a cluster and across restarts for a bridge ([`bridge_origin`]); the
    /// queue's id otherwise.
    pub origin: u64,
    policy: Policy,
    /// The group's queue and storage identity.
    pub queue: Arc<SessionHandle>,
    members: Mutex<Members>,
    /// Credit came back or a member arrived: the dispatcher looks again.
    wake: Notify,
    closed: AtomicBool,
    pub metrics: GroupMetrics,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group({})", self.key())
    }
}

/// `$share/NAME/FILTER` split and checked: ShareName non-empty without wildcards, FILTER a
/// valid topic filter ([MQTT-4.8.2-1], [MQTT-4.8.2-2]).
pub fn parse(filter: &str) -> Option<Result<(&str, &str), ()>> {
    let (name, inner) = crate::protocol::validate::shared_subscription(filter)?;
    let ok = !name.is_empty()
        && !name.contains(['+', '#'])
        && crate::protocol::validate::is_valid_topic_filter(inner);
    Some(if ok { Ok((name, inner)) } else { Err(()) })
}

/// Prefix of a declared queue's subscription.
pub const QUEUE_PREFIX: &str = "$queue/";

/// A subscription that makes its session a member of a group instead of an entry in the
/// subscription index. Its filter string is also the group's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership<'a> {
    /// `$share/NAME/FILTER`.
    Shared { share: &'a str, filter: &'a str },
    /// `$queue/NAME`.
    Queue(&'a str),
}

/// `filter` as a membership: None for an ordinary filter, `Some(Err(()))` for a malformed
/// shared subscription or queue name.
pub fn membership(filter: &str) -> Option<Result<Membership<'_>, ()>> {
    if let Some(name) = filter.strip_prefix(QUEUE_PREFIX) {
        return Some(if crate::config::queue_name_ok(name) {
            Ok(Membership::Queue(name))
        } else {
            Err(())
        });
    }
    parse(filter).map(|r| r.map(|(share, filter)| Membership::Shared { share, filter }))
}

/// A declared queue's key: `$queue/NAME`.
pub fn queue_key(name: &str) -> String {
    format!("{QUEUE_PREFIX}{name}")
}

/// Prefix of a bridge's outgoing queue's key (never a subscription clients may make).
pub const BRIDGE_PREFIX: &str = "$bridge/";

/// The origin of the messages bridge `name` brings in: the first 8 bytes of SHA-256 of its
/// name with the top bit set, so the same on every node and every release (session ids,
/// counted up from 1, never reach it).
pub fn bridge_origin(name: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("bridge:{name}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b) | (1 << 63)
}

/// A bridge's outgoing queue's key: `$bridge/NAME`.
pub fn bridge_key(name: &str) -> String {
    format!("{BRIDGE_PREFIX}{name}")
}

fn hash_of(a: impl Hash, b: u64) -> u64 {
    let mut h = DefaultHasher::new();
    a.hash(&mut h);
    b.hash(&mut h);
    h.finish()
}

impl Group {
    pub fn new(
        kind: Kind,
        share: &str,
        filter: &str,
        strategy: Strategy,
        queue: Arc<SessionHandle>,
        metrics: GroupMetrics,
    ) -> Group {
        let seed = hash_of(filter, queue.id) | 1;
        let origin = match kind {
            Kind::Bridge => bridge_origin(share),
            _ => queue.id,
        };
        Group {
            origin,
            share: Arc::from(share),
            filters: Mutex::new(vec![Arc::from(filter)]),
            kind,
            policy: Policy::default(),
            queue,
            members: Mutex::new(Members {
                list: Vec::new(),
                strategy,
                cursor: 0,
                rng: seed,
            }),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            metrics,
        }
    }

    /// `$share/NAME/FILTER`, or `$queue/NAME`: also the members' subscription filter.
    pub fn key(&self) -> String {
        match self.kind {
            Kind::Shared => format!("$share/{}/{}", self.share, self.filter()),
            Kind::Queue => queue_key(&self.share),
            Kind::Bridge => bridge_key(&self.share),
        }
    }

    /// The topic filter of the messages the group takes (a bridge's first).
    pub fn filter(&self) -> Arc<str> {
        self.filters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .first()
            .cloned()
            .unwrap_or_else(|| Arc::from(""))
    }

    /// Every topic filter of the messages the group takes.
    pub fn filters(&self) -> Vec<Arc<str>> {
        self.filters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A declared queue's (or bridge's) filters change (reload); returns the old ones.
    pub(crate) fn set_filters(&self, filters: &[&str]) -> Vec<Arc<str>> {
        let mut f = self.filters.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *f, filters.iter().map(|s| Arc::from(*s)).collect())
    }

    pub fn strategy(&self) -> Strategy {
        self.lock().strategy
    }

    pub(crate) fn set_strategy(&self, strategy: Strategy) {
        self.lock().strategy = strategy;
    }

    /// A declared queue's policy from its configuration (declaration or reload).
    pub(crate) fn set_policy(&self, drop_oldest: bool, ttl: std::time::Duration) {
        self.policy
            .drop_oldest
            .store(drop_oldest, Ordering::Relaxed);
        self.policy.ttl_secs.store(ttl.as_secs(), Ordering::Relaxed);
    }

    /// Whether a declared queue is still in the configuration (it collects).
    pub fn declared(&self) -> bool {
        self.policy.declared.load(Ordering::Relaxed)
    }

    pub(crate) fn set_declared(&self, declared: bool) {
        self.policy.declared.store(declared, Ordering::Relaxed);
    }

    /// Whether messages of `qos` go into this group: a declared queue keeps what may not be
    /// lost, QoS 1 and 2.
    pub fn takes(&self, qos: QoS) -> bool {
        self.kind != Kind::Queue || qos != QoS::AtMostOnce
    }

    /// A full declared queue makes room for new messages by dropping its oldest.
    pub fn drops_oldest(&self) -> bool {
        self.policy.drop_oldest.load(Ordering::Relaxed)
    }

    /// The highest QoS a member may be given, and what the index entry asks for: a declared
    /// queue keeps each message's own QoS; a shared group the highest its members asked for.
    pub(crate) fn index_qos(&self) -> QoS {
        match self.kind {
            Kind::Queue | Kind::Bridge => QoS::ExactlyOnce,
            Kind::Shared => self.max_qos(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Members> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn member_count(&self) -> usize {
        self.lock().list.len()
    }

    /// Each member's client id, whether it is online, and how many group messages it holds
    /// unfinished (the admin API's view).
    pub fn member_view(&self) -> Vec<(Arc<str>, bool, usize)> {
        self.lock()
            .list
            .iter()
            .map(|m| (m.session.client_id.clone(), m.online, m.outstanding))
            .collect()
    }

    /// Highest QoS any member subscribed with: what the group's queue keeps.
    fn max_qos(&self) -> QoS {
        self.lock()
            .list
            .iter()
            .map(|m| m.options.qos)
            .max()
            .unwrap_or(QoS::AtMostOnce)
    }

    /// Adds or updates a member. `window` is its connection's in-flight window (0 and
    /// `online` false for a session restored or subscribed while away).
    pub fn join(
        &self,
        session: &Arc<SessionHandle>,
        options: SubscriptionOptions,
        sub_id: Option<u32>,
        online: bool,
        window: usize,
    ) {
        let mut m = self.lock();
        match m.list.iter_mut().find(|x| x.session.id == session.id) {
            Some(x) => {
                x.options = options;
                x.sub_id = sub_id;
                x.online = online;
                x.window = window;
            }
            None => m.list.push(Member {
                session: session.clone(),
                options,
                sub_id,
                online,
                window,
                outstanding: 0,
                lane: VecDeque::new(),
            }),
        }
        let any = m.list.iter().any(|x| x.online);
        drop(m);
        self.queue.outbox.set_online(any);
        self.wake.notify_one();
    }

    /// A member's connection attached (`window` its in-flight window) or left.
    pub fn set_online(&self, session_id: u64, online: bool, window: usize) {
        let mut m = self.lock();
        let mut back = Vec::new();
        if let Some(x) = m.list.iter_mut().find(|x| x.session.id == session_id) {
            x.online = online;
            x.window = window;
            if !online {
                x.outstanding -= x.lane.len().min(x.outstanding);
                back.extend(x.lane.drain(..));
            }
        }
        let any = m.list.iter().any(|x| x.online);
        drop(m);
        self.requeue(back);
        self.queue.outbox.set_online(any);
        self.wake.notify_one();
    }

    /// Removes a member; returns whether the group is now empty.
    pub fn leave(&self, session_id: u64) -> bool {
        let mut m = self.lock();
        let mut back = Vec::new();
        if let Some(i) = m.list.iter().position(|x| x.session.id == session_id) {
            let x = m.list.remove(i);
            back.extend(x.lane);
        }
        let any = m.list.iter().any(|x| x.online);
        let empty = m.list.is_empty();
        drop(m);
        if !empty {
            self.requeue(back);
        }
        self.queue.outbox.set_online(any);
        self.wake.notify_one();
        empty
    }

    /// Puts deliveries back at the front of the group's queue (without member fields).
    fn requeue(&self, items: Vec<Delivery>) {
        if items.is_empty() {
            return;
        }
        self.metrics.redelivered.inc_by(items.len() as u64);
        self.queue
            .outbox
            .requeue_front(items.into_iter().map(strip_member_fields));
    }

    /// Deliveries that went to a member and come back, their entries (if stored) still in the
    /// group's queue.
    pub fn take_back(&self, items: Vec<Delivery>) {
        self.requeue(items);
        self.wake.notify_one();
    }

    /// A member finished a delivery of this group (acknowledged, or sent at QoS 0): its
    /// credit comes back.
    pub fn release(&self, session_id: u64) {
        let mut m = self.lock();
        if let Some(x) = m.list.iter_mut().find(|x| x.session.id == session_id) {
            x.outstanding = x.outstanding.saturating_sub(1);
        }
        drop(m);
        self.wake.notify_one();
    }

    /// A member holds one of the group's deliveries it got before a restart.
    pub fn hold(&self, session_id: u64) {
        let mut m = self.lock();
        if let Some(x) = m.list.iter_mut().find(|x| x.session.id == session_id) {
            x.outstanding += 1;
        }
    }

    /// Moves deliveries from `session_id`'s lane into `out`: QoS 0 freely, QoS 1/2 while
    /// `slots` lasts, at most `max` in all.
    pub fn take_lane(
        &self,
        session_id: u64,
        mut slots: usize,
        max: usize,
        out: &mut Vec<Delivery>,
    ) {
        let mut m = self.lock();
        let Some(x) = m.list.iter_mut().find(|x| x.session.id == session_id) else {
            return;
        };
        while out.len() < max {
            let Some(front) = x.lane.front() else { break };
            if front.qos != QoS::AtMostOnce {
                if slots == 0 {
                    break;
                }
                slots -= 1;
            }
            if let Some(d) = x.lane.pop_front() {
                out.push(d);
            }
        }
    }

    /// Whether `session_id` has deliveries waiting in its lane.
    pub fn lane_len(&self, session_id: u64) -> usize {
        self.lock()
            .list
            .iter()
            .find(|x| x.session.id == session_id)
            .map_or(0, |x| x.lane.len())
    }

    /// Picks the member for `d`, or None when the member it must go to has no credit.
    fn choose(&self, m: &mut Members, d: &Delivery) -> Option<usize> {
        let n = m.list.len();
        if n == 0 {
            return None;
        }
        match m.strategy {
            Strategy::RoundRobin => {
                for k in 0..n {
                    let i = (m.cursor + k) % n;
                    if m.list[i].has_credit() {
                        m.cursor = (i + 1) % n;
                        return Some(i);
                    }
                }
                None
            }
            Strategy::Random => {
                let eligible = m.list.iter().filter(|x| x.has_credit()).count();
                if eligible == 0 {
                    return None;
                }
                m.rng ^= m.rng << 13;
                m.rng ^= m.rng >> 7;
                m.rng ^= m.rng << 17;
                let pick = (m.rng % eligible as u64) as usize;
                m.list
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| x.has_credit())
                    .nth(pick)
                    .map(|(i, _)| i)
            }
            Strategy::HashClientid | Strategy::HashTopic => {
                // Rendezvous hashing over connected members: a member joining or leaving moves
                // only the keys that hash to it.
                let key = match m.strategy {
                    Strategy::HashClientid => hash_of(d.msg.origin, 0),
                    _ => hash_of(d.msg.topic.as_str(), 0),
                };
                let best = m
                    .list
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| x.online)
                    .max_by_key(|(_, x)| hash_of(key, x.session.id))
                    .map(|(i, _)| i)?;
                // Ordering per key: wait for that member rather than give it to another.
                m.list[best].has_credit().then_some(best)
            }
        }
    }

    /// Hands queued messages to members with credit until none is left or nobody can take
    /// more. Loads the queue's on-disk part when memory is empty. A declared queue first drops
    /// what its policy says must go from the head: the oldest while it is over its limits
    /// (`overflow = "drop_oldest"`), and messages older than its `message_ttl`.
    pub fn dispatch(self: &Arc<Self>, broker: &Broker) {
        let mut woken: Vec<Arc<SessionHandle>> = Vec::new();
        let mut ops = Vec::new();
        // Bounded work per call (16 disk batches); a later wake-up goes on.
        let mut loads = 0;
        let ttl = self.policy.ttl_secs.load(Ordering::Relaxed);
        let now = if ttl > 0 {
            crate::storage::record::unix_now_ms() / 1000
        } else {
            0
        };
        let expired = |d: &Delivery| {
            ttl > 0 && d.enqueued != 0 && u64::from(d.enqueued).saturating_add(ttl) <= now
        };
        let trims = self.kind == Kind::Queue && self.drops_oldest();
        loop {
            let over = trims && self.queue.outbox.over_limits();
            let mut m = self.lock();
            let mut chosen = None;
            let mut dropped = None;
            let popped = self.queue.outbox.pop_if(|d| {
                if over || expired(d) {
                    dropped = Some(over);
                    return true;
                }
                chosen = self.choose(&mut m, d);
                chosen.is_some()
            });
            match popped {
                Popped::Item(d) if dropped.is_some() => {
                    drop(m);
                    if dropped == Some(true) {
                        self.metrics.evicted(1);
                        broker.metrics.dropped_overflow.inc();
                    } else {
                        self.metrics.expired(1);
                        broker.metrics.dropped_expired.inc();
                    }
                    if broker.tracer.active() {
                        broker.tracer.group_dropped(&d.msg, &self.queue, dropped);
                    }
                    if let Some(seq) = d.seq {
                        ops.push(Op::Dequeue {
                            session_id: self.queue.id,
                            seq,
                        });
                    }
                    if let Some(peers) = broker.peers() {
                        // In a cluster the message is gone for the whole queue.
                        peers.group_done(d.msg.id);
                    }
                }
                Popped::Item(mut d) => {
                    let Some(i) = chosen else { break };
                    let x = &mut m.list[i];
                    d.qos = d.qos.min(x.options.qos);
                    d.retain = d.retain && x.options.retain_as_published;
                    d.sub_ids = x.sub_id.map_or(SubIds::None, SubIds::One);
                    d.group = Some(self.id());
                    x.lane.push_back(d);
                    x.outstanding += 1;
                    if x.lane.len() == 1 {
                        woken.push(x.session.clone());
                    }
                    self.metrics.delivered.inc();
                }
                Popped::Refused => break,
                Popped::Empty => {
                    drop(m);
                    if loads == 16 || !broker.load_spilled(&self.queue, &mut ops) {
                        break;
                    }
                    loads += 1;
                }
            }
        }
        for s in woken {
            s.outbox.wake();
        }
        if !ops.is_empty() {
            let _ = broker.store.submit(ops);
        }
    }

    /// Makes the dispatcher look again (a declared queue took a message beyond its limits,
    /// or its time to live may have passed for the head).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// The group's dispatcher: runs until the group is closed (or the broker is gone; it
    /// holds no strong reference, so a stopped broker is dropped and its store closed).
    pub async fn run(self: Arc<Self>, broker: std::sync::Weak<Broker>) {
        while !self.closed.load(Ordering::Acquire) {
            let Some(b) = broker.upgrade() else { return };
            self.dispatch(&b);
            drop(b);
            if self.kind == Kind::Queue && self.drops_oldest() && self.queue.outbox.over_limits() {
                // Still over its limits after a bounded round of trimming: go on, after
                // letting others run.
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = self.queue.outbox.ready() => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// The id deliveries carry for this group: its queue's storage id.
    pub fn id(&self) -> GroupId {
        GroupId(self.queue.id)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn is_member(&self, session_id: u64) -> bool {
        self.lock().list.iter().any(|x| x.session.id == session_id)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// A delivery returning to the group's queue loses what was applied for one member. Its
/// `seq`, if any, is its entry in the group's queue again.
pub fn strip_member_fields(mut d: Delivery) -> Delivery {
    d.group = None;
    d.stored = d.seq.is_some();
    d.sub_ids = SubIds::None;
    d.order = 0;
    // QoS and RETAIN were lowered for the member; the message's own are the group's upper bound
    // (the dispatcher applies the next member's options again).
    d.qos = d.msg.qos;
    d.retain = d.msg.retain;
    d
}

/// The groups by `$share/NAME/FILTER` and by id, always the same set.
#[derive(Default)]
struct Index {
    by_key: HashMap<String, Arc<Group>>,
    by_id: HashMap<GroupId, Arc<Group>>,
}

/// Every group, by `$share/NAME/FILTER` (and by [`GroupId`]).
#[derive(Default)]
pub struct Groups {
    map: Mutex<Index>,
}

impl Groups {
    fn lock(&self) -> MutexGuard<'_, Index> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, key: &str) -> Option<Arc<Group>> {
        self.lock().by_key.get(key).cloned()
    }

    /// The live group a delivery came through; none once that group ended.
    pub fn by_id(&self, id: GroupId) -> Option<Arc<Group>> {
        self.lock().by_id.get(&id).cloned()
    }

    /// Stops every group's dispatcher (broker shutdown).
    pub fn close_all(&self) {
        for g in self.lock().by_key.values() {
            g.close();
        }
    }

    pub fn all(&self) -> Vec<Arc<Group>> {
        self.lock().by_key.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `on` on the group of `key` (made by `make` when there is none) under the map's
    /// lock, so a concurrent removal of an emptied group cannot lose the joining member.
    /// Returns the group and whether it was made now.
    pub fn join(
        &self,
        key: &str,
        make: impl FnOnce() -> Arc<Group>,
        on: impl FnOnce(&Arc<Group>),
    ) -> (Arc<Group>, bool) {
        let mut map = self.lock();
        let (g, created) = match map.by_key.get(key) {
            Some(g) => (g.clone(), false),
            None => {
                let g = make();
                map.by_key.insert(key.to_string(), g.clone());
                map.by_id.insert(g.id(), g.clone());
                (g, true)
            }
        };
        on(&g);
        (g, created)
    }

    /// Removes `group` if it has no member left (checked under the map's lock so a member
    /// joining meanwhile keeps it); a declared queue only once no longer declared and empty.
    pub fn remove_if_empty(&self, group: &Arc<Group>) -> bool {
        let mut map = self.lock();
        if group.member_count() > 0 {
            return false;
        }
        // A queue's length counts places reserved and not yet committed.
        if group.kind != Kind::Shared && (group.declared() || !group.queue.outbox.is_empty()) {
            return false;
        }
        let key = group.key();
        if map.by_key.get(&key).is_some_and(|g| Arc::ptr_eq(g, group)) {
            map.by_key.remove(&key);
            map.by_id.remove(&group.id());
        }
        group.close();
        true
    }
}

/// Durable record key of a group.
pub fn record_key(key: &str) -> String {
    format!("{RECORD_PREFIX}{key}")
}

/// Gives a delivery back to its group when its in-flight record lives in a persistent
/// member's session (`stored`): a new entry in the group's queue replaces the member's record,
/// in one submit so the message's reference count never touches zero. The entry becomes
/// visible to the dispatcher when `staged` is committed.
pub fn give_back_stored(
    group: &Group,
    member_session: u64,
    packet_id: u16,
    d: &Delivery,
    staged: &mut Staged,
) {
    let r = group
        .queue
        .outbox
        .reserve_with(d.msg.weight(), true, d.enqueued);
    let (Reservation::Hot { seq, .. } | Reservation::Spill { seq, .. }) = r else {
        return;
    };
    staged.ops.push(Op::Enqueue {
        session_id: group.queue.id,
        seq,
        entry: QueueEntry {
            msg_id: d.msg.id,
            qos: d.msg.qos,
            retain: d.msg.retain,
            sub_ids: Vec::new(),
            enqueued: d.enqueued,
        },
    });
    staged.ops.push(Op::DeleteInflight {
        session_id: member_session,
        packet_id,
    });
    let back = strip_member_fields(d.clone());
    staged
        .after
        .extend(After::reserved(group.queue.clone(), r, back));
    group.metrics.redelivered.inc();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Staged;
    use crate::config::Config;
    use crate::message::Message;
    use crate::outbox::Outbox;
    use crate::protocol::{MqttStr, PublishProperties};
    use bytes::Bytes;

    #[test]
    fn share_names_are_checked() {
        assert_eq!(parse("a/b"), None);
        assert_eq!(parse("$share/g/a/+"), Some(Ok(("g", "a/+"))));
        assert_eq!(parse("$share/g/#"), Some(Ok(("g", "#"))));
        for bad in [
            "$share/g",
            "$share/g/",
            "$share//a",
            "$share/g+/a",
            "$share/#/a",
            "$share/g/a/#/b",
        ] {
            assert_eq!(parse(bad), Some(Err(())), "{bad}");
        }
    }

    fn broker() -> Broker {
        let config = Config::default();
        let auth = crate::auth::Authorizer::load(&config.mqtt.response_prefix, &config.auth)
            .expect("no auth files");
        Broker::new(
            config,
            crate::metrics::Metrics::new().expect("metrics"),
            Arc::new(crate::storage::MemoryStore),
            auth,
        )
    }

    fn session(id: u64) -> Arc<SessionHandle> {
        Arc::new(SessionHandle::new(
            id,
            Arc::from(format!("c{id}")),
            Outbox::new(1000, 1 << 20),
            false,
        ))
    }

    fn group(b: &Broker, strategy: Strategy) -> Arc<Group> {
        let g = b.make_group(Kind::Shared, "g", "t/#", None);
        g.set_strategy(strategy);
        g
    }

    fn publish(g: &Group, n: u64, origin: u64, topic: &str) {
        for i in 0..n {
            let msg = Arc::new(Message {
                id: i,
                topic: MqttStr::from(topic),
                payload: Bytes::from(i.to_string()),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: PublishProperties::default(),
                expires_at: None,
                origin,
                received: None,
            });
            let d = Delivery::new(msg, QoS::AtLeastOnce, false, SubIds::None);
            assert_eq!(g.queue.outbox.push(d), crate::outbox::Pushed::Queued);
        }
    }

    fn qos1() -> SubscriptionOptions {
        SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..SubscriptionOptions::default()
        }
    }

    fn lane(g: &Group, s: &SessionHandle) -> Vec<u64> {
        let mut out = Vec::new();
        g.take_lane(s.id, usize::MAX, usize::MAX, &mut out);
        out.iter().map(|d| d.msg.id).collect()
    }

    #[test]
    fn round_robin_takes_turns_among_members_with_credit() {
        let b = broker();
        let g = group(&b, Strategy::RoundRobin);
        let (a, c, d) = (session(1), session(2), session(3));
        g.join(&a, qos1(), None, true, 10);
        g.join(&c, qos1(), Some(7), true, 10);
        g.join(&d, qos1(), None, false, 0); // away: never picked
        publish(&g, 6, 99, "t/x");
        g.dispatch(&b);
        assert_eq!(lane(&g, &a), vec![0, 2, 4]);
        let mut out = Vec::new();
        g.take_lane(c.id, usize::MAX, usize::MAX, &mut out);
        assert_eq!(
            out.iter().map(|d| d.msg.id).collect::<Vec<_>>(),
            vec![1, 3, 5]
        );
        assert_eq!(
            out[0].sub_ids.as_slice(),
            &[7],
            "the member's own identifier"
        );
        assert_eq!(out[0].group, Some(g.id()));
        assert_eq!(lane(&g, &d), Vec::<u64>::new());
        assert_eq!(g.metrics.delivered.get(), 6);
    }

    #[test]
    fn a_member_gets_no_more_than_its_window_and_the_rest_waits_in_the_group() {
        let b = broker();
        let g = group(&b, Strategy::RoundRobin);
        let (slow, fast) = (session(1), session(2));
        g.join(&slow, qos1(), None, true, 2);
        g.join(&fast, qos1(), None, true, 3);
        publish(&g, 10, 99, "t/x");
        g.dispatch(&b);
        assert_eq!(lane(&g, &slow), vec![0, 2]);
        assert_eq!(lane(&g, &fast), vec![1, 3, 4]);
        assert_eq!(
            g.queue.outbox.len(),
            5,
            "no credit left: the group keeps the rest"
        );
        // The fast member finishes two: it gets the next two, the slow one nothing.
        g.release(fast.id);
        g.release(fast.id);
        g.dispatch(&b);
        assert_eq!(lane(&g, &fast), vec![5, 6]);
        assert_eq!(lane(&g, &slow), Vec::<u64>::new());
    }

    #[test]
    fn a_member_going_away_gives_its_lane_back_in_order() {
        let b = broker();
        let g = group(&b, Strategy::RoundRobin);
        let (a, c) = (session(1), session(2));
        g.join(&a, qos1(), None, true, 100);
        g.join(&c, qos1(), None, true, 1);
        publish(&g, 6, 99, "t/x");
        g.dispatch(&b);
        // a has 0, 2, 3, 4, 5 assigned (c took 1 and has no more credit); a leaves.
        g.set_online(a.id, false, 0);
        assert_eq!(g.metrics.redelivered.get(), 5);
        assert_eq!(g.queue.outbox.len(), 5);
        g.release(c.id);
        g.set_online(c.id, true, 100);
        g.dispatch(&b);
        assert_eq!(lane(&g, &c), vec![1, 0, 2, 3, 4, 5]);
        // Leaving for good (last member): the group is empty.
        assert!(!g.leave(a.id));
        assert!(g.leave(c.id));
    }

    #[test]
    fn hash_clientid_keeps_each_publisher_on_one_member() {
        let b = broker();
        let g = group(&b, Strategy::HashClientid);
        let members: Vec<_> = (1..=4).map(session).collect();
        for m in &members {
            g.join(m, qos1(), None, true, 1000);
        }
        for origin in 100..120 {
            publish(&g, 5, origin, "t/x");
        }
        g.dispatch(&b);
        let mut owners = std::collections::HashMap::new();
        let mut used = 0;
        for m in &members {
            let mut out = Vec::new();
            g.take_lane(m.id, usize::MAX, usize::MAX, &mut out);
            used += usize::from(!out.is_empty());
            let mut last = HashMap::new();
            for d in out {
                assert_eq!(*owners.entry(d.msg.origin).or_insert(m.id), m.id);
                let prev = last.insert(d.msg.origin, d.msg.id);
                assert!(prev.is_none_or(|p| p < d.msg.id), "in order per publisher");
            }
        }
        assert_eq!(owners.len(), 20);
        assert!(used > 1, "20 publishers spread over more than one member");
    }

    #[test]
    fn hash_topic_waits_for_the_chosen_member() {
        let b = broker();
        let g = group(&b, Strategy::HashTopic);
        let (a, c) = (session(1), session(2));
        g.join(&a, qos1(), None, true, 1);
        g.join(&c, qos1(), None, true, 1);
        publish(&g, 3, 99, "t/one");
        g.dispatch(&b);
        let (first, second) = if g.lane_len(a.id) == 1 {
            (&a, &c)
        } else {
            (&c, &a)
        };
        assert_eq!(lane(&g, first), vec![0]);
        assert_eq!(
            g.lane_len(second.id),
            0,
            "never to the other member: order per topic"
        );
        g.release(first.id);
        g.dispatch(&b);
        assert_eq!(lane(&g, first), vec![1]);
    }

    #[test]
    fn random_uses_every_member_with_credit() {
        let b = broker();
        let g = group(&b, Strategy::Random);
        let members: Vec<_> = (1..=3).map(session).collect();
        for m in &members {
            g.join(m, qos1(), None, true, 1000);
        }
        publish(&g, 300, 99, "t/x");
        g.dispatch(&b);
        for m in &members {
            let n = lane(&g, m).len();
            assert!(n > 30, "member {} got {n} of 300", m.id);
        }
    }

    #[test]
    fn member_options_apply_at_dispatch() {
        let b = broker();
        let g = group(&b, Strategy::RoundRobin);
        let a = session(1);
        g.join(&a, SubscriptionOptions::default(), None, true, 10);
        publish(&g, 1, 99, "t/x");
        g.dispatch(&b);
        let mut out = Vec::new();
        g.take_lane(a.id, 0, 10, &mut out);
        assert_eq!(out.len(), 1, "QoS 0 needs no slot");
        assert_eq!(out[0].qos, QoS::AtMostOnce, "lowered to the member's QoS");
        let back = strip_member_fields(out.remove(0));
        assert_eq!(back.qos, QoS::AtLeastOnce, "the message's own QoS again");
        assert!(back.group.is_none());
    }

    #[test]
    fn queue_memberships_are_named_and_checked() {
        assert_eq!(
            membership("$queue/orders"),
            Some(Ok(Membership::Queue("orders")))
        );
        assert_eq!(
            membership("$share/g/a/#"),
            Some(Ok(Membership::Shared {
                share: "g",
                filter: "a/#"
            }))
        );
        for bad in [
            "$queue/",
            "$queue/a/b",
            "$queue/+",
            "$queue/#",
            "$queue/a b",
        ] {
            assert_eq!(membership(bad), Some(Err(())), "{bad}");
        }
        assert_eq!(membership("queue/orders"), None);
    }

    fn declared(b: &Arc<Broker>, toml: &str) -> Arc<Group> {
        let c = Config::from_toml(toml).expect("config");
        b.declare_queues(&c.queues);
        b.groups
            .get(&queue_key(&c.queues[0].name))
            .expect("declared")
    }

    fn routed(b: &Broker, id: u64, qos: QoS) -> super::super::Routed {
        let msg = Arc::new(Message {
            id,
            topic: MqttStr::from("shop/orders/1"),
            payload: Bytes::from(id.to_string()),
            qos,
            retain: false,
            properties: PublishProperties::default(),
            expires_at: None,
            origin: 7,
            received: Some(crate::clock::now()),
        });
        b.publish(&msg, &mut Vec::new(), &mut Staged::default())
    }

    #[tokio::test]
    async fn a_declared_queue_collects_qos_1_and_2_without_consumers() {
        let b = Arc::new(broker());
        let g = declared(
            &b,
            "[[queues]]\nname = \"orders\"\nfilter = \"shop/orders/#\"\n",
        );
        assert_eq!(g.key(), "$queue/orders");
        assert!(routed(&b, 1, QoS::AtLeastOnce).matched == 1);
        assert!(routed(&b, 2, QoS::ExactlyOnce).matched == 1);
        assert_eq!(
            routed(&b, 3, QoS::AtMostOnce).matched,
            0,
            "QoS 0 is not kept"
        );
        assert_eq!(g.queue.outbox.len(), 2);
        let d = g.queue.outbox.memory_items();
        assert_eq!(d[1].qos, QoS::ExactlyOnce, "at the message's own QoS");
        assert!(d[0].enqueued > 0, "the enqueue time is kept");
        // No longer declared: it stops collecting, keeps its messages, and stays until empty.
        b.declare_queues(&[]);
        assert_eq!(routed(&b, 4, QoS::AtLeastOnce).matched, 0);
        assert!(b.groups.get("$queue/orders").is_some());
        assert_eq!(g.queue.outbox.len(), 2);
        let a = session(1);
        assert!(b
            .subscribe_queue(&a, "orders", qos1(), None, true, 10)
            .is_some());
        g.dispatch(&b);
        assert_eq!(lane(&g, &a), vec![1, 2]);
        assert!(g.leave(a.id));
        b.drop_group(&g);
        assert!(b.groups.get("$queue/orders").is_none(), "drained and gone");
        assert!(b
            .subscribe_queue(&a, "orders", qos1(), None, true, 10)
            .is_none());
    }

    #[tokio::test]
    async fn drop_oldest_makes_room_and_reject_refuses() {
        let b = Arc::new(broker());
        let g = declared(
            &b,
            "[[queues]]\nname = \"q\"\nfilter = \"shop/#\"\nmax_messages = 3\noverflow = \"drop_oldest\"\n",
        );
        for id in 1..=5 {
            let r = routed(&b, id, QoS::AtLeastOnce);
            assert_eq!(r.dropped, 0, "always taken");
        }
        let ids: Vec<u64> = g
            .queue
            .outbox
            .memory_items()
            .iter()
            .map(|d| d.msg.id)
            .collect();
        assert_eq!(ids, vec![3, 4, 5], "the oldest went");
        assert_eq!(g.metrics.evicted.as_ref().map(|c| c.get()), Some(2));
        assert_eq!(b.metrics.dropped_overflow.get(), 2);
        // Reloaded with the default overflow: a full queue refuses.
        let g = declared(
            &b,
            "[[queues]]\nname = \"q\"\nfilter = \"shop/#\"\nmax_messages = 3\n",
        );
        let r = routed(&b, 6, QoS::AtLeastOnce);
        assert_eq!((r.matched, r.dropped), (1, 1));
        assert_eq!(g.metrics.dropped.get(), 1);
        assert_eq!(g.queue.outbox.len(), 3);
    }

    #[tokio::test]
    async fn messages_past_the_time_to_live_leave_the_head() {
        let b = Arc::new(broker());
        let g = declared(
            &b,
            "[[queues]]\nname = \"q\"\nfilter = \"shop/#\"\nmessage_ttl = \"1h\"\n",
        );
        routed(&b, 1, QoS::AtLeastOnce);
        routed(&b, 2, QoS::AtLeastOnce);
        // The first entered two hours ago.
        let mut old = g.queue.outbox.memory_items();
        g.queue.outbox.clear();
        old[0].enqueued -= 7200;
        for d in old {
            g.queue.outbox.push(d);
        }
        let a = session(1);
        b.subscribe_queue(&a, "q", qos1(), None, true, 10);
        g.dispatch(&b);
        assert_eq!(lane(&g, &a), vec![2]);
        assert_eq!(g.metrics.expired.as_ref().map(|c| c.get()), Some(1));
        assert_eq!(b.metrics.dropped_expired.get(), 1);
    }
}
