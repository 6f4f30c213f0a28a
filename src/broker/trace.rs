//! Message trace (issue 18): the fate of the messages an operator asks about, step by step,
//! as it happens. "Where did message X go?" is the first question once delivery is
//! guaranteed, and the counters cannot answer it: they say how many, not which. A trace
//! selects messages by client (publisher or receiver), exact topic or topic filter, lasts a
//! fixed time, and streams one [`Event`] per step: received, stored, matched, queued (per
//! target), sent, acknowledged, dropped or expired.
//!
//! # What it costs when nobody traces
//! Every hook on the publish and delivery paths is one guarded call:
//!
//! ```ignore
//! if broker.tracer.active() {
//!     broker.tracer.sent(&client_id, &delivery, packet_id, false, group);
//! }
//! ```
//!
//! [`Tracer::active`] is **one relaxed load** of an `AtomicUsize` (the number of active
//! traces) held inline in the `Broker`: no lock, no allocation, no shared write, so a broker
//! nobody traces pays one load per hook. The hook bodies are `#[cold]` and
//! `#[inline(never)]`: the code that builds events stays out of the hot functions. Relaxed is
//! enough: a trace started a moment ago may miss the step a message is taking on another
//! thread right now and see its next one; tracing is observation, nothing depends on it.
//!
//! # Never blocking the publish path
//! Each trace has a bounded channel ([`BUFFER`] events) filled with `try_send`: when its reader
//! (an HTTP response, `admin/trace.rs`) falls behind, events are counted as lost instead of
//! waited for, and an [`What::Overflow`] event with the count goes out as soon as there is
//! room again. Events are built on the hook's thread (their timestamps are the step's) and
//! rendered to JSON by the reader ([`Event::to_json`]).
//!
//! # Order per target
//! Events of one target (a session, or a shared group's queue) come in the order they
//! happened; targets interleave. The one race is "queued" (the publisher's thread, or the
//! storage thread when a commit makes a stored delivery visible) against "sent" (the
//! receiver's connection, which may pop the delivery the instant it is pushed): so a traced
//! push holds the trace's lock across the push and its event ([`Tracer::queue`]), and "sent"
//! takes the same lock. Lock order is trace, then queue; no hook runs under a queue's lock.
//!
//! # Bounds
//! At most [`MAX_TRACES`] traces at once; per trace, the message ids it follows
//! ([`FOLLOWED`]), the send instants kept for acknowledgement latency ([`SENT`]) and the
//! received events waiting to learn whether a traced receiver gets their message
//! ([`PENDING`]) are bounded, oldest out first.

use super::shared::{Group, Kind, RECORD_PREFIX};
use super::{After, Subscriber};
use crate::message::Message;
use crate::outbox::{Delivery, Pushed};
use crate::protocol::validate::{is_valid_topic_filter, is_valid_topic_name, topic_matches};
use crate::protocol::QoS;
use crate::session::registry::SessionHandle;
use crate::storage::record::unix_now_ms;
use serde::Serialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Traces active at once: each makes every message pay the cold path, so a few.
pub const MAX_TRACES: usize = 4;
/// Events a trace buffers for its reader; beyond, they are counted as lost.
pub const BUFFER: usize = 10_000;
/// Message ids a trace remembers as followed (for steps that do not show what selected the
/// message: a client trace's stored, queued and sent events of a message its client published).
pub const FOLLOWED: usize = 65_536;
/// Send instants kept per trace for the acknowledgement latency.
pub const SENT: usize = 10_000;
/// Received events a client trace holds until routing says whether its client receives
/// the message (a handful: routing follows receipt at once on the same thread).
pub const PENDING: usize = 64;
/// The longest trace.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// Which messages a trace follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Messages this client publishes, and deliveries to it.
    ClientId(String),
    /// Messages on exactly this topic.
    Topic(String),
    /// Messages whose topic matches this filter.
    Filter(String),
}

impl Selector {
    /// Checks what a selector names, so a trace that could never match is refused.
    pub fn checked(self) -> Result<Selector, TraceError> {
        match &self {
            Selector::ClientId(c) if c.is_empty() => Err(TraceError::EmptyClientId),
            Selector::Topic(t) if !is_valid_topic_name(t) => Err(TraceError::BadTopic),
            Selector::Filter(f) if !is_valid_topic_filter(f) => Err(TraceError::BadFilter),
            _ => Ok(self),
        }
    }

    /// Whether the topic alone selects the message.
    fn topic_selects(&self, topic: &str) -> bool {
        match self {
            Selector::Topic(t) => t == topic,
            Selector::Filter(f) => topic_matches(f, topic),
            Selector::ClientId(_) => false,
        }
    }

    fn client(&self) -> Option<&str> {
        match self {
            Selector::ClientId(c) => Some(c),
            _ => None,
        }
    }
}

/// Why a trace cannot start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("{MAX_TRACES} traces are active already")]
    Busy,
    #[error("client_id is empty")]
    EmptyClientId,
    #[error("topic is not a valid topic name")]
    BadTopic,
    #[error("filter is not a valid topic filter")]
    BadFilter,
    #[error("duration must be more than 0 and at most 1 h")]
    BadDuration,
}

/// Why a message was lost for a target: the `reason` labels of `tern_messages_dropped_total`
/// (`metrics.rs`). Expiry, that counter's `expired`, is its own event ([`What::Expired`]);
/// `purged` (an operator emptying a queue through the admin API) drops a queue by count and
/// is not traced per message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    QueueFull,
    TooLarge,
    NotAuthorized,
    NoSubscribers,
    RetainedFull,
    StorageFailed,
    Overflow,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::QueueFull,
        Reason::TooLarge,
        Reason::NotAuthorized,
        Reason::NoSubscribers,
        Reason::RetainedFull,
        Reason::StorageFailed,
        Reason::Overflow,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::QueueFull => "queue_full",
            Reason::TooLarge => "too_large",
            Reason::NotAuthorized => "not_authorized",
            Reason::NoSubscribers => "no_subscribers",
            Reason::RetainedFull => "retained_full",
            Reason::StorageFailed => "storage_failed",
            Reason::Overflow => "overflow",
        }
    }
}

/// The acknowledgement a receiver sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    PubAck,
    PubRec,
    PubComp,
}

impl Ack {
    fn name(self) -> &'static str {
        match self {
            Ack::PubAck => "PUBACK",
            Ack::PubRec => "PUBREC",
            Ack::PubComp => "PUBCOMP",
        }
    }
}

/// One step of one message, as a trace saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Wall clock, Unix milliseconds.
    pub unix_ms: u64,
    /// Monotonic microseconds since the trace started (for ordering and intervals: the wall
    /// clock may step).
    pub t_us: u64,
    /// The message's broker-wide id (`Message::id`); None for [`What::Overflow`].
    pub msg: Option<u64>,
    pub topic: Option<Arc<str>>,
    pub what: What,
}

/// A client id or group key in an event: shared with the broker's own (`Arc<str>`), so an
/// event copies no string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// What happened. A target is a client id, or a group's key (`$share/NAME/FILTER`,
/// `$queue/NAME`, `$bridge/NAME`) for a group's own queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum What {
    /// A client published it.
    Received {
        client: Name,
        #[serde(skip_serializing_if = "Option::is_none")]
        packet_id: Option<u16>,
        qos: u8,
        size: usize,
        retain: bool,
    },
    /// The commit that stores it is durable; `commit_us` from its submit.
    Stored { commit_us: u64 },
    /// The subscriptions it matched: sessions' client ids, and groups by kind.
    Matched {
        sessions: Vec<Name>,
        groups: Vec<String>,
        queues: Vec<String>,
        bridges: Vec<String>,
    },
    /// It entered a target's queue (a stored delivery: once its commit is durable).
    Queued { target: Name, qos: u8 },
    /// A connection wrote it to its client.
    Sent {
        target: Name,
        #[serde(skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        packet_id: Option<u16>,
        qos: u8,
        dup: bool,
    },
    /// The client acknowledged it; `latency_us` since it was last sent, when known.
    Acknowledged {
        target: Name,
        packet_id: u16,
        ack: &'static str,
        reason: u8,
        latency_us: Option<u64>,
    },
    /// Lost for a target (or for all, without one).
    Dropped {
        #[serde(skip_serializing_if = "Option::is_none")]
        target: Option<Name>,
        reason: &'static str,
    },
    /// Its Message Expiry (or a declared queue's time to live) passed before it was sent.
    Expired {
        #[serde(skip_serializing_if = "Option::is_none")]
        target: Option<Name>,
    },
    /// The reader fell behind: this many events were lost before this one.
    Overflow { lost: u64 },
}

impl What {
    pub fn name(&self) -> &'static str {
        match self {
            What::Received { .. } => "received",
            What::Stored { .. } => "stored",
            What::Matched { .. } => "matched",
            What::Queued { .. } => "queued",
            What::Sent { .. } => "sent",
            What::Acknowledged { .. } => "acknowledged",
            What::Dropped { .. } => "dropped",
            What::Expired { .. } => "expired",
            What::Overflow { .. } => "overflow",
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    event: &'static str,
    ts: u64,
    t_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    msg: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(flatten)]
    what: &'a What,
}

impl Event {
    /// One JSON object, without the line end.
    pub fn to_json(&self) -> Vec<u8> {
        let line = Line {
            event: self.what.name(),
            ts: self.unix_ms,
            t_us: self.t_us,
            msg: self.msg,
            topic: self.topic.as_deref(),
            what: &self.what,
        };
        // Serialising plain fields into a Vec cannot fail; an empty object says so if it did.
        serde_json::to_vec(&line).unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// A started trace, for its reader: its events until it ends, and when that is.
pub struct Started {
    pub id: u64,
    pub events: mpsc::Receiver<Event>,
    pub started: Instant,
    pub ends: Instant,
}

/// The message ids a trace follows, with their topics (for the steps that carry only an id),
/// oldest first out.
#[derive(Default)]
struct Followed {
    order: VecDeque<u64>,
    topics: HashMap<u64, Arc<str>>,
}

impl Followed {
    fn insert(&mut self, id: u64, topic: &Arc<str>) {
        if self.topics.insert(id, topic.clone()).is_some() {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > FOLLOWED {
            if let Some(old) = self.order.pop_front() {
                self.topics.remove(&old);
            }
        }
    }

    fn contains(&self, id: u64) -> bool {
        self.topics.contains_key(&id)
    }
}

#[derive(Default)]
struct State {
    /// Events the reader had no room for since the last one it got.
    lost: u64,
    followed: Followed,
    /// Received events of a client trace whose client did not publish them, until routing
    /// says whether that client receives them.
    pending: VecDeque<Event>,
    /// When a (target, packet id) was last sent.
    sent_at: HashMap<(Arc<str>, u16), Instant>,
}

struct Trace {
    id: u64,
    selector: Selector,
    started: Instant,
    ends: Instant,
    tx: mpsc::Sender<Event>,
    state: Mutex<State>,
}

/// When a step happened, read once per hook for every trace.
#[derive(Clone, Copy)]
struct Stamp {
    now: Instant,
    unix_ms: u64,
}

impl Stamp {
    fn now() -> Stamp {
        Stamp {
            now: crate::clock::now(),
            unix_ms: unix_now_ms(),
        }
    }
}

impl Trace {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn live(&self, now: Instant) -> bool {
        now < self.ends && !self.tx.is_closed()
    }

    /// Whether this trace follows message `id` on `topic` at `target`.
    fn wants(&self, st: &State, id: u64, topic: &str, target: Option<&str>) -> bool {
        self.selector.topic_selects(topic)
            || (self.selector.client().is_some_and(|c| target == Some(c))
                || st.followed.contains(id))
    }

    fn event(&self, at: Stamp, msg: Option<(u64, &Arc<str>)>, what: What) -> Event {
        Event {
            unix_ms: at.unix_ms,
            t_us: u64::try_from(at.now.saturating_duration_since(self.started).as_micros())
                .unwrap_or(u64::MAX),
            msg: msg.map(|(id, _)| id),
            topic: msg.map(|(_, t)| t.clone()),
            what,
        }
    }

    /// Hands an event to the reader without waiting: a full buffer counts it as lost, and
    /// the count goes out first once there is room.
    fn send(&self, st: &mut State, ev: Event) {
        if st.lost > 0 {
            let overflow = Event {
                msg: None,
                topic: None,
                what: What::Overflow { lost: st.lost },
                ..ev.clone()
            };
            match self.tx.try_send(overflow) {
                Ok(()) => st.lost = 0,
                Err(_) => {
                    st.lost += 1;
                    return;
                }
            }
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(ev) {
            st.lost += 1;
        }
    }

    fn emit(&self, st: &mut State, at: Stamp, msg: Option<(u64, &Arc<str>)>, what: What) {
        let ev = self.event(at, msg, what);
        self.send(st, ev);
    }
}

/// The name a trace gives a queue: a client id, or a group's key for a group's own queue
/// (whose record client id is the key behind [`RECORD_PREFIX`]).
fn target_name(session: &SessionHandle) -> Arc<str> {
    match session.client_id.strip_prefix(RECORD_PREFIX) {
        Some(key) => Arc::from(key),
        None => session.client_id.clone(),
    }
}

fn qos(q: QoS) -> u8 {
    q as u8
}

/// The active traces. See the module doc for what each costs.
#[derive(Default)]
pub struct Tracer {
    /// Active traces: the one thing a hook reads when nobody traces.
    active: AtomicUsize,
    traces: RwLock<Vec<Arc<Trace>>>,
    next_id: AtomicU64,
}

impl Tracer {
    /// Whether any trace is active: one relaxed load, the whole cost of a hook when none is.
    #[inline(always)]
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed) != 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Trace>>> {
        self.traces.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Trace>>> {
        self.traces.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a trace of `selector` for `duration`. At most [`MAX_TRACES`] at once.
    pub fn start(&self, selector: Selector, duration: Duration) -> Result<Started, TraceError> {
        self.start_with(selector, duration, BUFFER)
    }

    fn start_with(
        &self,
        selector: Selector,
        duration: Duration,
        buffer: usize,
    ) -> Result<Started, TraceError> {
        let selector = selector.checked()?;
        if duration.is_zero() || duration > MAX_DURATION {
            return Err(TraceError::BadDuration);
        }
        let now = crate::clock::now();
        let mut traces = self.write();
        traces.retain(|t| t.live(now));
        if traces.len() >= MAX_TRACES {
            self.active.store(traces.len(), Ordering::Relaxed);
            return Err(TraceError::Busy);
        }
        let (tx, events) = mpsc::channel(buffer.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let ends = now + duration;
        traces.push(Arc::new(Trace {
            id,
            selector,
            started: now,
            ends,
            tx,
            state: Mutex::new(State::default()),
        }));
        self.active.store(traces.len(), Ordering::Relaxed);
        Ok(Started {
            id,
            events,
            started: now,
            ends,
        })
    }

    /// Ends trace `id` now (its reader went away, or its time is up). Its reader gets what
    /// was buffered, then the end of its events (once no pending commit still holds it).
    pub fn stop(&self, id: u64) {
        let mut traces = self.write();
        traces.retain(|t| t.id != id);
        self.active.store(traces.len(), Ordering::Relaxed);
    }

    /// Drops traces whose time is up or whose reader is gone (the broker's once-a-second
    /// sweep), so a trace ends by itself even if its reader never says.
    pub fn prune(&self) {
        if !self.active() {
            return;
        }
        let now = crate::clock::now();
        let mut traces = self.write();
        traces.retain(|t| t.live(now));
        self.active.store(traces.len(), Ordering::Relaxed);
    }

    /// Calls `f` with each live trace, its state locked, one at a time.
    fn each(&self, at: Stamp, mut f: impl FnMut(&Trace, &mut State)) {
        for t in self.read().iter() {
            if t.live(at.now) {
                f(t, &mut t.lock());
            }
        }
    }

    /// A client published `msg` (`packet_id` 0 at QoS 0).
    #[cold]
    #[inline(never)]
    pub fn received(&self, msg: &Message, client: &Arc<str>, packet_id: u16) {
        let at = Stamp::now();
        let topic: Arc<str> = Arc::from(msg.topic.as_str());
        self.each(at, |t, st| {
            let what = What::Received {
                client: Name(client.clone()),
                packet_id: (packet_id != 0).then_some(packet_id),
                qos: qos(msg.qos),
                size: msg.payload.len(),
                retain: msg.retain,
            };
            if t.selector.topic_selects(&topic) || t.selector.client() == Some(&**client) {
                st.followed.insert(msg.id, &topic);
                t.emit(st, at, Some((msg.id, &topic)), what);
            } else if t.selector.client().is_some() {
                // Routing, next on this thread, says whether the traced client receives it.
                st.pending
                    .push_back(t.event(at, Some((msg.id, &topic)), what));
                if st.pending.len() > PENDING {
                    st.pending.pop_front();
                }
            }
        });
    }

    /// Routing found `subs` for `msg` (No Local applied, one entry per subscription).
    #[cold]
    #[inline(never)]
    pub fn matched(&self, msg: &Message, subs: &[Subscriber]) {
        let at = Stamp::now();
        let topic: Arc<str> = Arc::from(msg.topic.as_str());
        let mut sessions: Vec<Name> = Vec::new();
        let (mut groups, mut queues, mut bridges) = (Vec::new(), Vec::new(), Vec::new());
        let mut seen = HashSet::new();
        for s in subs {
            match &s.group {
                None => {
                    if seen.insert(s.session.id) {
                        sessions.push(Name(s.session.client_id.clone()));
                    }
                }
                Some(g) => match g.kind {
                    Kind::Shared => groups.push(g.key()),
                    Kind::Queue => queues.push(g.share.to_string()),
                    Kind::Bridge => bridges.push(g.share.to_string()),
                },
            }
        }
        self.each(at, |t, st| {
            let stashed = st
                .pending
                .iter()
                .position(|e| e.msg == Some(msg.id))
                .and_then(|i| st.pending.remove(i));
            let receives = t
                .selector
                .client()
                .is_some_and(|c| sessions.iter().any(|s| &**s == c));
            if !(receives || t.selector.topic_selects(&topic) || st.followed.contains(msg.id)) {
                return;
            }
            st.followed.insert(msg.id, &topic);
            if let Some(ev) = stashed {
                t.send(st, ev);
            }
            let what = What::Matched {
                sessions: sessions.clone(),
                groups: groups.clone(),
                queues: queues.clone(),
                bridges: bridges.clone(),
            };
            t.emit(st, at, Some((msg.id, &topic)), what);
        });
    }

    /// Runs `push` (a delivery of `msg` into `target`'s queue) with every trace that follows
    /// it locked, then gives each the event `outcome` says: "sent" from the receiver's
    /// connection, which takes the same lock, cannot come before it.
    #[cold]
    #[inline(never)]
    pub fn queue<R>(
        &self,
        target: &SessionHandle,
        msg: &Message,
        push: impl FnOnce() -> R,
        outcome: impl Fn(&R, &Arc<str>) -> Option<What>,
    ) -> R {
        let traces = self.read();
        queue_in(&traces, target, msg, push, outcome)
    }

    /// [`Tracer::queue`] for `session.outbox.push`: queued, or dropped when full.
    #[cold]
    #[inline(never)]
    pub fn push(&self, session: &SessionHandle, delivery: Delivery) -> Pushed {
        let msg = delivery.msg.clone();
        let q = delivery.qos;
        self.queue(
            session,
            &msg,
            || session.outbox.push(delivery),
            |pushed, target| match pushed {
                Pushed::Queued => Some(What::Queued {
                    target: Name(target.clone()),
                    qos: qos(q),
                }),
                Pushed::DroppedFull => Some(What::Dropped {
                    target: Some(Name(target.clone())),
                    reason: Reason::QueueFull.label(),
                }),
                // QoS 0 to an offline session is not kept, by design: nothing to report.
                Pushed::SkippedOffline => None,
            },
        )
    }

    /// [`Tracer::queue`] for `queue.outbox.push_evicting` (a declared queue that drops its
    /// oldest): queued, and the oldest it pushed out dropped (`overflow`). Returns how many.
    #[cold]
    #[inline(never)]
    pub fn push_evicting(&self, queue: &SessionHandle, delivery: Delivery) -> usize {
        let msg = delivery.msg.clone();
        let q = delivery.qos;
        let evicted = self.queue(
            queue,
            &msg,
            || queue.outbox.push_evicting(delivery),
            |_, target| {
                Some(What::Queued {
                    target: Name(target.clone()),
                    qos: qos(q),
                })
            },
        );
        for d in &evicted {
            self.dropped_at(&d.msg, queue, Reason::Overflow);
        }
        evicted.len()
    }

    /// `msg` was lost for the queue of `target` (a session's or a group's) for `reason`.
    #[cold]
    #[inline(never)]
    pub fn dropped_at(&self, msg: &Message, target: &SessionHandle, reason: Reason) {
        let name = target_name(target);
        self.dropped(msg.id, msg.topic.as_str(), Some(&name), reason);
    }

    /// `msg` was lost for `target` (None: for every target) for `reason`.
    #[cold]
    #[inline(never)]
    pub fn dropped(&self, id: u64, topic: &str, target: Option<&str>, reason: Reason) {
        let at = Stamp::now();
        let topic: Arc<str> = Arc::from(topic);
        self.each(at, |t, st| {
            if t.wants(st, id, &topic, target) {
                let what = What::Dropped {
                    target: target.map(|t| Name(Arc::from(t))),
                    reason: reason.label(),
                };
                t.emit(st, at, Some((id, &topic)), what);
            }
        });
    }

    /// A declared queue's dispatcher dropped `msg` from its head: `Some(true)` over its
    /// limits (`overflow`), else past its time to live (expired).
    #[cold]
    #[inline(never)]
    pub fn group_dropped(&self, msg: &Message, queue: &SessionHandle, over: Option<bool>) {
        if over == Some(true) {
            self.dropped_at(msg, queue, Reason::Overflow);
        } else {
            self.expired_at(msg, queue);
        }
    }

    /// `msg` expired in the queue of `target` (a session's or a group's).
    #[cold]
    #[inline(never)]
    pub fn expired_at(&self, msg: &Message, target: &SessionHandle) {
        let name = target_name(target);
        self.expired(msg.id, msg.topic.as_str(), Some(&name));
    }

    /// `msg` expired before it reached `target` (None: a retained message or unknown).
    #[cold]
    #[inline(never)]
    pub fn expired(&self, id: u64, topic: &str, target: Option<&str>) {
        let at = Stamp::now();
        let topic: Arc<str> = Arc::from(topic);
        self.each(at, |t, st| {
            if t.wants(st, id, &topic, target) {
                let what = What::Expired {
                    target: target.map(|t| Name(Arc::from(t))),
                };
                t.emit(st, at, Some((id, &topic)), what);
            }
        });
    }

    /// `client`'s connection wrote `d` (`dup`: a re-send on reconnect); `group` when it came
    /// through a shared group or declared queue.
    #[cold]
    #[inline(never)]
    pub fn sent(
        &self,
        client: &Arc<str>,
        d: &Delivery,
        packet_id: u16,
        dup: bool,
        group: Option<&Group>,
    ) {
        let at = Stamp::now();
        let topic: Arc<str> = Arc::from(d.msg.topic.as_str());
        let group = group.map(Group::key);
        self.each(at, |t, st| {
            let via_group = group
                .as_deref()
                .is_some_and(|g| t.wants(st, d.msg.id, &topic, Some(g)));
            if !(via_group || t.wants(st, d.msg.id, &topic, Some(client))) {
                return;
            }
            if d.qos != QoS::AtMostOnce {
                let key = (client.clone(), packet_id);
                if st.sent_at.len() < SENT || st.sent_at.contains_key(&key) {
                    st.sent_at.insert(key, at.now);
                }
            }
            let what = What::Sent {
                target: Name(client.clone()),
                group: group.clone(),
                packet_id: (d.qos != QoS::AtMostOnce).then_some(packet_id),
                qos: qos(d.qos),
                dup,
            };
            t.emit(st, at, Some((d.msg.id, &topic)), what);
        });
    }

    /// `client` acknowledged `d`, sent under `packet_id`, with `ack` and its reason code.
    #[cold]
    #[inline(never)]
    pub fn acknowledged(
        &self,
        client: &Arc<str>,
        d: &Delivery,
        packet_id: u16,
        ack: Ack,
        reason: u8,
    ) {
        let at = Stamp::now();
        let topic: Arc<str> = Arc::from(d.msg.topic.as_str());
        self.each(at, |t, st| {
            if !t.wants(st, d.msg.id, &topic, Some(client)) {
                return;
            }
            let key = (client.clone(), packet_id);
            // A PUBREC that accepts leaves the exchange open for PUBCOMP.
            let sent = if ack == Ack::PubRec && reason < 0x80 {
                st.sent_at.get(&key).copied()
            } else {
                st.sent_at.remove(&key)
            };
            let what = What::Acknowledged {
                target: Name(client.clone()),
                packet_id,
                ack: ack.name(),
                reason,
                latency_us: sent.map(|s| {
                    u64::try_from(at.now.saturating_duration_since(s).as_micros())
                        .unwrap_or(u64::MAX)
                }),
            };
            t.emit(st, at, Some((d.msg.id, &topic)), what);
        });
    }

    /// What a commit about to be submitted must report when it completes: "stored" for the
    /// traced messages among `put` (those it stores), and its deliveries' "queued" (or
    /// "dropped" if it fails). None when no trace is live.
    #[cold]
    #[inline(never)]
    pub fn watch(&self, put: &[u64]) -> Option<Watch> {
        let now = crate::clock::now();
        let traces: Vec<Arc<Trace>> = self
            .read()
            .iter()
            .filter(|t| t.live(now))
            .cloned()
            .collect();
        (!traces.is_empty()).then(|| Watch {
            traces,
            put: put.to_vec(),
            submitted: now,
        })
    }
}

/// [`Tracer::queue`] over `traces`: lock those that follow the delivery, in their order (the
/// same everywhere, so two pushes cannot deadlock), run `push`, emit, unlock.
fn queue_in<R>(
    traces: &[Arc<Trace>],
    target: &SessionHandle,
    msg: &Message,
    push: impl FnOnce() -> R,
    outcome: impl Fn(&R, &Arc<str>) -> Option<What>,
) -> R {
    let now = crate::clock::now();
    let name = target_name(target);
    let topic: Arc<str> = Arc::from(msg.topic.as_str());
    let mut held: Vec<(&Trace, MutexGuard<'_, State>)> = Vec::new();
    for t in traces {
        if !t.live(now) {
            continue;
        }
        let st = t.lock();
        if t.wants(&st, msg.id, &topic, Some(&name)) {
            held.push((t, st));
        }
    }
    let r = push();
    if held.is_empty() {
        return r;
    }
    let at = Stamp::now();
    if let Some(what) = outcome(&r, &name) {
        for (t, st) in &mut held {
            t.emit(st, at, Some((msg.id, &topic)), what.clone());
        }
    }
    r
}

/// A commit's part in the traces live when it was submitted (see [`Tracer::watch`]); run by
/// the store with the commit's outcome, on whatever thread completes it.
pub struct Watch {
    traces: Vec<Arc<Trace>>,
    put: Vec<u64>,
    submitted: Instant,
}

impl Watch {
    /// The commit is durable: "stored" for the traced messages it put, then its deliveries
    /// become visible, each traced one with its "queued" (in that order, under the lock).
    pub fn durable(self, after: Vec<After>) {
        let at = Stamp::now();
        let commit_us = u64::try_from(at.now.saturating_duration_since(self.submitted).as_micros())
            .unwrap_or(u64::MAX);
        for t in &self.traces {
            let mut st = t.lock();
            for id in &self.put {
                if let Some(topic) = st.followed.topics.get(id).cloned() {
                    t.emit(&mut st, at, Some((*id, &topic)), What::Stored { commit_us });
                }
            }
        }
        for a in after {
            let Some((session, msg, q)) = a.traced() else {
                a.durable();
                continue;
            };
            let (session, msg) = (session.clone(), msg.clone());
            queue_in(
                &self.traces,
                &session,
                &msg,
                || a.durable(),
                |_, target| {
                    Some(What::Queued {
                        target: Name(target.clone()),
                        qos: qos(q),
                    })
                },
            );
        }
    }

    /// The commit failed: its traced deliveries are dropped (`storage_failed`).
    pub fn failed(&self, after: &[After]) {
        let at = Stamp::now();
        for a in after {
            let Some((session, msg, _)) = a.traced() else {
                continue;
            };
            let name = target_name(session);
            let topic: Arc<str> = Arc::from(msg.topic.as_str());
            for t in &self.traces {
                let mut st = t.lock();
                if t.wants(&st, msg.id, &topic, Some(&name)) {
                    let what = What::Dropped {
                        target: Some(Name(name.clone())),
                        reason: Reason::StorageFailed.label(),
                    };
                    t.emit(&mut st, at, Some((msg.id, &topic)), what);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Outbox, SubIds};
    use crate::protocol::{MqttStr, PublishProperties, SubscriptionOptions};
    use bytes::Bytes;

    fn msg(id: u64, topic: &str) -> Arc<Message> {
        Arc::new(Message {
            id,
            topic: MqttStr::from(topic),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: PublishProperties::default(),
            expires_at: None,
            origin: 1,
            received: None,
        })
    }

    fn session(id: u64, client: &str, max: usize) -> Arc<SessionHandle> {
        let s = SessionHandle::new(id, Arc::from(client), Outbox::new(max, usize::MAX), false);
        s.outbox.set_online(true);
        Arc::new(s)
    }

    fn sub(s: &Arc<SessionHandle>) -> Subscriber {
        Subscriber {
            session: s.clone(),
            options: SubscriptionOptions::default(),
            id: None,
            group: None,
        }
    }

    fn delivery(m: &Arc<Message>) -> Delivery {
        Delivery::new(m.clone(), QoS::AtLeastOnce, false, SubIds::None)
    }

    fn start(t: &Tracer, s: Selector) -> Started {
        t.start(s, Duration::from_secs(60)).expect("started")
    }

    /// Everything buffered now, as (event name, msg id, target).
    fn drain(s: &mut Started) -> Vec<(&'static str, Option<u64>, Option<String>)> {
        let mut out = Vec::new();
        while let Ok(e) = s.events.try_recv() {
            let target = match &e.what {
                What::Queued { target, .. }
                | What::Sent { target, .. }
                | What::Acknowledged { target, .. } => Some(target.to_string()),
                What::Dropped { target, .. } | What::Expired { target } => {
                    target.as_ref().map(|t| t.to_string())
                }
                _ => None,
            };
            out.push((e.what.name(), e.msg, target));
        }
        out
    }

    fn names(s: &mut Started) -> Vec<&'static str> {
        drain(s).into_iter().map(|(n, _, _)| n).collect()
    }

    #[test]
    fn topic_and_filter_traces_take_their_topics_only() {
        let t = Tracer::default();
        let mut exact = start(&t, Selector::Topic("a/b".into()));
        let mut filtered = start(&t, Selector::Filter("a/+".into()));
        let client: Arc<str> = Arc::from("pub");
        for (id, topic) in [(1, "a/b"), (2, "a/c"), (3, "x/y"), (4, "a/b/c")] {
            t.received(&msg(id, topic), &client, 7);
        }
        let ids = |s: &mut Started| drain(s).into_iter().map(|(_, m, _)| m).collect::<Vec<_>>();
        assert_eq!(ids(&mut exact), vec![Some(1)]);
        assert_eq!(ids(&mut filtered), vec![Some(1), Some(2)]);
    }

    #[test]
    fn a_client_trace_follows_what_its_client_publishes_and_receives() {
        let t = Tracer::default();
        let mut tr = start(&t, Selector::ClientId("c".into()));
        let (c, other) = (session(1, "c", 10), session(2, "other", 10));
        let (from_c, from_other): (Arc<str>, Arc<str>) = (Arc::from("c"), Arc::from("p"));
        // Published by c, received by other: followed at every step, whoever the target.
        let m1 = msg(1, "t/1");
        t.received(&m1, &from_c, 1);
        t.matched(&m1, &[sub(&other)]);
        t.push(&other, delivery(&m1));
        // Published by p, received by c: its received event waits for routing, then goes.
        let m2 = msg(2, "t/2");
        t.received(&m2, &from_other, 2);
        t.matched(&m2, &[sub(&c), sub(&other)]);
        t.push(&c, delivery(&m2));
        t.push(&other, delivery(&m2));
        // Published by p, received by other only: nothing.
        let m3 = msg(3, "t/3");
        t.received(&m3, &from_other, 3);
        t.matched(&m3, &[sub(&other)]);
        t.push(&other, delivery(&m3));
        let s = |x: &str| Some(x.to_string());
        assert_eq!(
            drain(&mut tr),
            vec![
                ("received", Some(1), None),
                ("matched", Some(1), None),
                ("queued", Some(1), s("other")),
                ("received", Some(2), None),
                ("matched", Some(2), None),
                ("queued", Some(2), s("c")),
                // m2 is followed once matched to c: its other targets are part of its story.
                ("queued", Some(2), s("other")),
            ]
        );
    }

    #[test]
    fn at_most_four_traces_and_a_released_one_frees_its_place() {
        let t = Tracer::default();
        assert!(!t.active());
        let mut held: Vec<Started> = (0..MAX_TRACES)
            .map(|i| start(&t, Selector::Topic(format!("t/{i}"))))
            .collect();
        assert!(t.active());
        let busy = t.start(Selector::Topic("x".into()), Duration::from_secs(1));
        assert_eq!(busy.err(), Some(TraceError::Busy));
        // Stopped by its reader: the place is free at once, and its events end.
        let mut first = held.remove(0);
        t.stop(first.id);
        assert!(first.events.try_recv().is_err());
        held.push(start(&t, Selector::Topic("y".into())));
        // A reader that went away without saying: its place is free by the next start.
        drop(held.remove(0));
        held.push(start(&t, Selector::Topic("z".into())));
        for s in &held {
            t.stop(s.id);
        }
        assert!(!t.active());
    }

    #[test]
    fn bad_selectors_and_durations_are_refused() {
        let t = Tracer::default();
        let one = Duration::from_secs(1);
        let err = |s, d| t.start(s, d).err();
        assert_eq!(
            err(Selector::Topic("a/+".into()), one),
            Some(TraceError::BadTopic)
        );
        assert_eq!(
            err(Selector::Filter("a/#/b".into()), one),
            Some(TraceError::BadFilter)
        );
        assert_eq!(
            err(Selector::ClientId(String::new()), one),
            Some(TraceError::EmptyClientId)
        );
        let long = MAX_DURATION + one;
        assert_eq!(
            err(Selector::Topic("a".into()), long),
            Some(TraceError::BadDuration)
        );
        assert_eq!(
            err(Selector::Topic("a".into()), Duration::ZERO),
            Some(TraceError::BadDuration)
        );
        assert!(!t.active());
    }

    #[test]
    fn a_full_buffer_counts_what_it_loses_and_says_so_when_room_returns() {
        let t = Tracer::default();
        let mut tr = t
            .start_with(Selector::Topic("t".into()), Duration::from_secs(60), 2)
            .expect("started");
        for id in 1..=5 {
            t.dropped(id, "t", None, Reason::NoSubscribers);
        }
        // Two fit; three are lost, and nothing blocked.
        assert_eq!(drain(&mut tr).len(), 2);
        t.dropped(6, "t", None, Reason::NoSubscribers);
        let e = tr.events.try_recv().expect("overflow first");
        assert_eq!(e.what, What::Overflow { lost: 3 });
        assert!(String::from_utf8_lossy(&e.to_json()).contains(r#""event":"overflow","#));
        assert_eq!(tr.events.try_recv().expect("then the event").msg, Some(6));
        // Counted again from zero.
        t.dropped(7, "t", None, Reason::NoSubscribers);
        assert_eq!(drain(&mut tr), vec![("dropped", Some(7), None)]);
    }

    #[test]
    fn a_trace_ends_by_itself_at_its_duration() {
        let t = Tracer::default();
        let mut tr = t
            .start(Selector::Topic("t".into()), Duration::from_millis(40))
            .expect("started");
        t.dropped(1, "t", None, Reason::NoSubscribers);
        std::thread::sleep(Duration::from_millis(60));
        t.dropped(2, "t", None, Reason::NoSubscribers);
        assert_eq!(names(&mut tr), vec!["dropped"]);
        // Still counted until the sweep; the sweep ends it and its reader sees the end.
        assert!(t.active());
        t.prune();
        assert!(!t.active());
        assert!(matches!(
            tr.events.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    #[test]
    fn a_full_queue_shows_dropped_and_an_ack_its_latency() {
        let t = Tracer::default();
        let mut tr = start(&t, Selector::Topic("t".into()));
        let s = session(1, "slow", 1);
        let (m1, m2) = (msg(1, "t"), msg(2, "t"));
        assert_eq!(t.push(&s, delivery(&m1)), Pushed::Queued);
        assert_eq!(t.push(&s, delivery(&m2)), Pushed::DroppedFull);
        let client = s.client_id.clone();
        t.sent(&client, &delivery(&m1), 9, false, None);
        std::thread::sleep(Duration::from_millis(2));
        t.acknowledged(&client, &delivery(&m1), 9, Ack::PubAck, 0);
        let events: Vec<Event> = std::iter::from_fn(|| tr.events.try_recv().ok()).collect();
        let got: Vec<_> = events.iter().map(|e| (e.what.name(), e.msg)).collect();
        assert_eq!(
            got,
            vec![
                ("queued", Some(1)),
                ("dropped", Some(2)),
                ("sent", Some(1)),
                ("acknowledged", Some(1))
            ]
        );
        assert_eq!(
            events[1].what,
            What::Dropped {
                target: Some(Name(Arc::from("slow"))),
                reason: "queue_full"
            }
        );
        let What::Acknowledged {
            latency_us, ack, ..
        } = &events[3].what
        else {
            panic!("{:?}", events[3]);
        };
        assert_eq!(*ack, "PUBACK");
        assert!(latency_us.is_some_and(|l| l >= 2_000), "{latency_us:?}");
        let json: serde_json::Value = serde_json::from_slice(&events[2].to_json()).expect("json");
        assert_eq!(json["event"], "sent");
        assert_eq!(json["msg"], 1);
        assert_eq!(json["topic"], "t");
        assert_eq!(json["target"], "slow");
        assert_eq!(json["packet_id"], 9);
        assert_eq!(json["dup"], false);
        assert!(json["ts"].as_u64().is_some() && json["t_us"].as_u64().is_some());
        assert!(json.get("group").is_none());
    }

    /// "queued" is pushed by one thread and "sent" by the receiver's the moment it pops: each
    /// target's events must still come queued first.
    #[test]
    fn each_target_sees_queued_before_sent_across_threads() {
        const N: u64 = 2_000;
        let t = Arc::new(Tracer::default());
        let mut tr = start(&t, Selector::Filter("#".into()));
        let s = session(1, "rx", N as usize);
        let pusher = {
            let (t, s) = (t.clone(), s.clone());
            std::thread::spawn(move || {
                for id in 1..=N {
                    t.push(&s, delivery(&msg(id, "t")));
                }
            })
        };
        let client = s.client_id.clone();
        let mut popped = 0;
        let mut batch = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while popped < N && Instant::now() < deadline {
            s.outbox.pop_batch(64, 64, &mut batch);
            for d in batch.drain(..) {
                t.sent(&client, &d, 1, false, None);
                popped += 1;
            }
        }
        pusher.join().expect("pusher");
        assert_eq!(popped, N);
        let mut queued = HashSet::new();
        let mut n = 0;
        for (name, id, _) in drain(&mut tr) {
            match name {
                "queued" => assert!(queued.insert(id)),
                "sent" => assert!(queued.contains(&id), "sent before queued: {id:?}"),
                other => panic!("{other}"),
            }
            n += 1;
        }
        assert_eq!(n, 2 * N);
    }

    #[test]
    fn drop_reasons_are_the_labels_of_the_dropped_counter() {
        let m = crate::metrics::Metrics::new().expect("metrics");
        let text =
            String::from_utf8(m.render(&crate::metrics::BrokerState::default())).expect("utf-8");
        let mut labels: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("tern_messages_dropped_total{reason=\""))
            .filter_map(|l| l.split('"').next())
            .collect();
        labels.sort_unstable();
        let mut ours: Vec<&str> = Reason::ALL.iter().map(|r| r.label()).collect();
        // Expiry is its own event; an operator's purge (admin API) empties a queue at once
        // and by count, with no per-message step to trace.
        ours.extend(["expired", "purged"]);
        ours.sort_unstable();
        assert_eq!(labels, ours);
    }
}
