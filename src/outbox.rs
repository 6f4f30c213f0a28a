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
//!
//! With durable storage, a persistent session's QoS 1/2 messages take another path: the
//! publisher *reserves* a sequence number (the message's place in the session's on-disk
//! queue) and the delivery becomes visible only after the commit that stores it. At most
//! [`HOT_MAX`] messages per session are held in memory; beyond that (and while the client is
//! away) entries are *spilled*: they live only on disk and the connection loads them in
//! batches when it has drained memory. So a session may hold a million queued messages while
//! broker memory stays flat.

use crate::message::Message;
use crate::protocol::QoS;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
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
    /// Position in the session's durable queue, when it is stored there.
    pub seq: Option<u64>,
    /// Send order among the session's in-flight messages (set when first sent).
    pub order: u64,
    /// The message is in the durable store (queued, or recovered in flight): its in-flight
    /// state is recorded there too.
    pub stored: bool,
    /// The shared subscription group this delivery came through: `seq` is then a position in
    /// the group's queue, and finishing it returns in-flight credit to the group.
    pub group: Option<GroupId>,
    /// Made before its message was stored (a cluster's fast copy, `broker/early.rs`): the
    /// place in the session's durable queue its stored copy takes, if it gets one. Finishing
    /// the delivery asks the broker's early ledger whether that entry must go.
    pub early: Option<u64>,
    /// When it was routed into a queue (a session's, a group's, a declared queue's), in Unix
    /// seconds (0: unknown, or not routed: a retained message sent on subscribe): a declared
    /// queue's `message_ttl`, every queue's oldest age, and the latency of a delivery loaded
    /// from disk count from it. Four bytes that fit in the padding after the flags, so a
    /// delivery is no bigger for it.
    pub enqueued: u32,
}

/// A shared subscription group, named by the storage id of the group's queue (the id its
/// in-flight records keep). A delivery carries only this: the queue layer holds deliveries, it
/// does not know what a group is; whoever finishes a delivery looks its group up by the id
/// (a member's connection among the groups it belongs to, the broker in its group index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupId(pub u64);

impl Delivery {
    pub fn new(msg: Arc<Message>, qos: QoS, retain: bool, sub_ids: SubIds) -> Delivery {
        Delivery {
            msg,
            qos,
            retain,
            sub_ids,
            seq: None,
            order: 0,
            stored: false,
            group: None,
            early: None,
            enqueued: 0,
        }
    }
}

/// What [`Outbox::pop_if`] found at the front.
#[derive(Debug)]
pub enum Popped {
    Item(Delivery),
    /// The front delivery was refused by the caller's predicate.
    Refused,
    /// Nothing in memory (there may be entries on disk).
    Empty,
}

/// Messages of a persistent session kept in memory at most; the rest waits on disk.
pub const HOT_MAX: usize = 256;

/// Where a durable delivery goes, decided when its sequence number is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Into memory once committed: call [`Outbox::push_reserved`] then.
    Hot { seq: u64, epoch: u64 },
    /// Disk only: call [`Outbox::spill_committed`] once committed; the connection loads it.
    Spill { seq: u64, epoch: u64 },
    /// The queue is full (counted as `queue_full`).
    Full,
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
    /// Hot reservations whose commit has not completed yet.
    pending: usize,
    pending_bytes: usize,
    /// Entries that live only on disk, from seq `spill_from` on.
    spilled: usize,
    spilled_bytes: usize,
    spill_from: u64,
    /// Spilled seqs whose commit has not completed: the loader stops before the first.
    uncommitted: VecDeque<u64>,
    next_seq: u64,
    /// Bumped by `clear`, so reservations made before a clean start are ignored.
    epoch: u64,
    /// Early deliveries refused whose stream copies have not been queued yet: while any is
    /// outstanding, a later early delivery would overtake it, so none is made.
    early_refused: usize,
    /// No early delivery until every fast copy numbered below this has had its stream copy
    /// routed (set by a subscription, `broker/early.rs`).
    early_after: u64,
    /// The queue's limits (`limits.max_queued_*`, the persistent ones for a session that
    /// outlives its connection); changed when a client attaches with the other kind.
    max_messages: usize,
    max_bytes: usize,
    /// The enqueue second of the entry at `spill_from`, when known (0: not known here, ask the
    /// store): set when a spill starts, forgotten when the head moves. It answers the oldest
    /// age of a queue whose client is away (everything on disk) without a read per look.
    spill_head_enqueued: u32,
}

/// Where a queue's oldest message is, for its oldest age ([`Outbox::oldest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oldest {
    /// Nothing waits (or only messages with no enqueue time, such as retained ones).
    Nothing,
    /// The oldest waiting message was enqueued at this Unix second.
    Enqueued(u32),
    /// Only the disk holds messages and their head's time is not known here: the first
    /// entry from this seq on says.
    OnDisk(u64),
}

/// What recovery found on disk for a session's queue.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpillState {
    pub head: u64,
    pub next_seq: u64,
    pub len: usize,
    pub bytes: usize,
}

pub struct Outbox {
    queue: Mutex<Queue>,
    notify: Notify,
    /// Moving average of the publish-to-acknowledge latency of this queue's deliveries, in
    /// microseconds (0: none yet): the status page ranks consumers by it. Outside the lock,
    /// one relaxed load and store per acknowledgement; a group's members may race on it and
    /// lose an update, which an average shrugs off.
    latency_us: AtomicU64,
}

impl Outbox {
    pub fn new(max_messages: usize, max_bytes: usize) -> Outbox {
        Outbox {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                online: false,
                pending: 0,
                pending_bytes: 0,
                spilled: 0,
                spilled_bytes: 0,
                spill_from: 0,
                uncommitted: VecDeque::new(),
                next_seq: 1,
                epoch: 0,
                early_refused: 0,
                early_after: 0,
                max_messages,
                max_bytes,
                spill_head_enqueued: 0,
            }),
            notify: Notify::new(),
            latency_us: AtomicU64::new(0),
        }
    }

    /// A delivery of this queue was acknowledged `latency` after its message was received:
    /// the moving average takes an eighth of the difference (about the last eight count).
    pub fn acknowledged(&self, latency: Duration) {
        let x = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let old = self.latency_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            x
        } else if x >= old {
            old + (x - old) / 8
        } else {
            old - (old - x) / 8
        };
        self.latency_us.store(new.max(1), Ordering::Relaxed);
    }

    /// The moving average of [`Outbox::acknowledged`] latencies; None before the first.
    pub fn latency(&self) -> Option<Duration> {
        match self.latency_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Where the oldest waiting message is: the first of memory that was routed (memory
    /// holds the head of the queue), else the disk's head.
    pub fn oldest(&self) -> Oldest {
        let q = self.lock();
        // A retained message sent on subscribe carries no enqueue time; it is never long at
        // the front, so a few places suffice.
        if let Some(t) = q.items.iter().take(8).map(|d| d.enqueued).find(|&t| t != 0) {
            return Oldest::Enqueued(t);
        }
        if q.spilled == 0 {
            Oldest::Nothing
        } else if q.spill_head_enqueued != 0 {
            Oldest::Enqueued(q.spill_head_enqueued)
        } else {
            Oldest::OnDisk(q.spill_from)
        }
    }

    /// Whether [`Outbox::oldest`] would send its caller to the store.
    pub fn oldest_on_disk(&self) -> bool {
        matches!(self.oldest(), Oldest::OnDisk(_))
    }

    /// What the store said of the disk's head at `from`, kept while the head stays there.
    pub fn spill_head_read(&self, from: u64, enqueued: u32) {
        let mut q = self.lock();
        if q.spilled > 0 && q.spill_from == from {
            q.spill_head_enqueued = enqueued;
        }
    }

    #[cfg(test)]
    pub fn limits(&self) -> (usize, usize) {
        let q = self.lock();
        (q.max_messages, q.max_bytes)
    }

    /// New limits: what is queued stays; new messages are refused while the queue is above
    /// them.
    pub fn set_limits(&self, max_messages: usize, max_bytes: usize) {
        let mut q = self.lock();
        q.max_messages = max_messages;
        q.max_bytes = max_bytes;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `d` (of `weight` bytes) to the memory queue, lets go of the lock, and wakes
    /// the draining connection if the queue was empty.
    fn append(&self, mut q: std::sync::MutexGuard<'_, Queue>, d: Delivery, weight: usize) {
        let was_empty = q.items.is_empty();
        q.items.push_back(d);
        q.bytes += weight;
        drop(q);
        if was_empty {
            self.notify.notify_one();
        }
    }

    pub fn push(&self, d: Delivery) -> Pushed {
        let weight = d.msg.weight();
        let q = self.lock();
        if d.qos == QoS::AtMostOnce {
            if !q.online {
                return Pushed::SkippedOffline;
            }
            if q.items.len() >= q.max_messages / 2 || q.bytes + weight > q.max_bytes / 2 {
                return Pushed::DroppedFull;
            }
        } else if q.items.len() >= q.max_messages || q.bytes + weight > q.max_bytes {
            return Pushed::DroppedFull;
        }
        self.append(q, d, weight);
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

    /// Pops the front delivery if `take` accepts it (a shared subscription group choosing a
    /// member for it).
    pub fn pop_if(&self, take: impl FnOnce(&Delivery) -> bool) -> Popped {
        let mut q = self.lock();
        match q.items.front() {
            None => Popped::Empty,
            Some(front) if !take(front) => Popped::Refused,
            Some(_) => match q.items.pop_front() {
                Some(d) => {
                    q.bytes -= d.msg.weight();
                    Popped::Item(d)
                }
                None => Popped::Empty,
            },
        }
    }

    /// Whether the queue holds more than its limits allow (a declared queue that drops its
    /// oldest took new messages beyond them).
    pub fn over_limits(&self) -> bool {
        let q = self.lock();
        q.items.len() + q.pending + q.spilled > q.max_messages
            || q.bytes + q.pending_bytes + q.spilled_bytes > q.max_bytes
    }

    /// [`Outbox::push`] for a declared queue that drops its oldest: a QoS 1/2 delivery that
    /// finds the queue full is taken all the same and the front makes room. Returns what was
    /// dropped.
    pub fn push_evicting(&self, d: Delivery) -> Vec<Delivery> {
        let weight = d.msg.weight();
        let mut q = self.lock();
        let mut dropped = Vec::new();
        while q.items.len() >= q.max_messages || q.bytes + weight > q.max_bytes {
            let Some(old) = q.items.pop_front() else {
                break;
            };
            q.bytes -= old.msg.weight();
            dropped.push(old);
        }
        self.append(q, d, weight);
        dropped
    }

    /// Puts deliveries taken earlier back at the front, in their order, whatever the limits:
    /// they were accepted once (a group member left before finishing them).
    pub fn requeue_front(&self, items: impl DoubleEndedIterator<Item = Delivery>) {
        let mut q = self.lock();
        let was_empty = q.items.is_empty();
        let mut any = false;
        for d in items.rev() {
            q.bytes += d.msg.weight();
            q.items.push_front(d);
            any = true;
        }
        drop(q);
        if was_empty && any {
            self.notify.notify_one();
        }
    }

    /// Whether a connection (for a group: any member) drains the queue and it holds at least
    /// `num/den` of its message or byte limit (memory, pending and on disk): back-pressure
    /// applies.
    pub fn drained_and_above(&self, num: usize, den: usize) -> bool {
        let q = self.lock();
        if !q.online {
            return false;
        }
        let count = q.items.len() + q.pending + q.spilled;
        let bytes = q.bytes + q.pending_bytes + q.spilled_bytes;
        count.saturating_mul(den) >= q.max_messages.saturating_mul(num)
            || bytes.saturating_mul(den) >= q.max_bytes.saturating_mul(num)
    }

    /// Wakes the connection draining this outbox (something for it arrived elsewhere, e.g. in
    /// a shared subscription group's lane).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Restores a durable queue found at startup: everything is on disk.
    pub fn restore(&self, s: SpillState) {
        let mut q = self.lock();
        q.next_seq = s.next_seq.max(1);
        q.spill_from = s.head;
        q.spilled = s.len;
        q.spilled_bytes = s.bytes;
    }

    /// Whether `count` more messages of `weight` bytes in all fit within the limits now
    /// (a cluster batch for a shared group is taken whole or not at all, `cluster/groups.rs`).
    pub fn fits(&self, count: usize, weight: usize) -> bool {
        let q = self.lock();
        let n = q.items.len() + q.pending + q.spilled;
        let bytes = q.bytes + q.pending_bytes + q.spilled_bytes;
        n + count <= q.max_messages && bytes + weight <= q.max_bytes
    }

    /// Reserves a place in the durable queue for a QoS 1/2 message of `weight` bytes.
    pub fn reserve(&self, weight: usize) -> Reservation {
        self.reserve_with(weight, false, 0)
    }

    /// [`Outbox::reserve`], with `force` ignoring the limits: for a message accepted once
    /// that comes back (a shared subscription member left without acknowledging it).
    /// `enqueued`: the delivery's enqueue second, kept if it starts the disk's part.
    pub fn reserve_with(&self, weight: usize, force: bool, enqueued: u32) -> Reservation {
        let mut q = self.lock();
        let count = q.items.len() + q.pending + q.spilled;
        let bytes = q.bytes + q.pending_bytes + q.spilled_bytes;
        if !force && (count >= q.max_messages || bytes + weight > q.max_bytes) {
            return Reservation::Full;
        }
        let seq = q.next_seq;
        q.next_seq += 1;
        let epoch = q.epoch;
        if q.online && q.spilled == 0 && q.items.len() + q.pending < HOT_MAX {
            q.pending += 1;
            q.pending_bytes += weight;
            Reservation::Hot { seq, epoch }
        } else {
            if q.spilled == 0 {
                q.spill_from = seq;
                q.spill_head_enqueued = enqueued;
            }
            q.spilled += 1;
            q.spilled_bytes += weight;
            q.uncommitted.push_back(seq);
            Reservation::Spill { seq, epoch }
        }
    }

    /// Pushes a QoS 1 delivery of a persistent session before its message is stored (a
    /// cluster's fast copy, `broker/early.rs`), taking a place in the durable queue for its
    /// stored copy when `durable`. Only while the client is attached and nothing of the queue
    /// waits elsewhere (on disk, for a commit, or as a refused early delivery whose stream
    /// copy is still to come): the delivery must not overtake one of them. `taken` learns the
    /// place before the delivery becomes visible (a PUBACK may follow at once). Returns
    /// (the place, the queue's epoch); or Err(epoch) when it must wait for the stream: the
    /// caller then owes an [`Outbox::early_settled`] once that stream copy is queued (or
    /// will never come).
    /// `settled`: every fast copy numbered below it has had its stream copy routed.
    pub fn push_early(
        &self,
        mut d: Delivery,
        durable: bool,
        settled: u64,
        taken: impl FnOnce(u64),
    ) -> Result<(Option<u64>, u64), u64> {
        let weight = d.msg.weight();
        let mut q = self.lock();
        if !q.online
            || q.early_refused > 0
            || settled < q.early_after
            || q.pending > 0
            || q.spilled > 0
            || q.items.len() >= HOT_MAX.min(q.max_messages)
            || q.bytes + weight > q.max_bytes
        {
            q.early_refused += 1;
            return Err(q.epoch);
        }
        let seq = durable.then(|| {
            let seq = q.next_seq;
            q.next_seq += 1;
            taken(seq);
            seq
        });
        d.early = seq;
        let epoch = q.epoch;
        self.append(q, d, weight);
        Ok((seq, epoch))
    }

    /// A subscription was made while fast copy `mark` was the next: messages routed before
    /// it may reach this session from their stream copies, and no early delivery may
    /// overtake them.
    pub fn early_after(&self, mark: u64) {
        let mut q = self.lock();
        q.early_after = q.early_after.max(mark);
    }

    /// The stream copy of an early delivery refused in `epoch` was queued (or is not coming).
    pub fn early_settled(&self, epoch: u64) {
        let mut q = self.lock();
        if q.epoch == epoch {
            q.early_refused = q.early_refused.saturating_sub(1);
        }
    }

    /// The queue's epoch (bumped by [`Outbox::clear`]).
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Makes a hot reservation's delivery visible after its commit.
    pub fn push_reserved(&self, d: Delivery, epoch: u64) {
        let weight = d.msg.weight();
        let mut q = self.lock();
        if q.epoch != epoch {
            return;
        }
        q.pending = q.pending.saturating_sub(1);
        q.pending_bytes = q.pending_bytes.saturating_sub(weight);
        self.append(q, d, weight);
    }

    /// A hot reservation's commit failed: its place is given back. True if the reservation
    /// was still open (false: a clean start cleared the queue meanwhile).
    pub fn release_reserved(&self, weight: usize, epoch: u64) -> bool {
        let mut q = self.lock();
        if q.epoch != epoch || q.pending == 0 {
            return false;
        }
        q.pending -= 1;
        q.pending_bytes = q.pending_bytes.saturating_sub(weight);
        true
    }

    /// A spilled reservation's commit failed: the entry never reached the disk, so it leaves
    /// the count, and the loader, no longer stopped at it, reads on past the gap.
    pub fn release_spilled(&self, seq: u64, weight: usize, epoch: u64) -> bool {
        let mut q = self.lock();
        if q.epoch != epoch {
            return false;
        }
        let Some(i) = q.uncommitted.iter().position(|&s| s == seq) else {
            return false;
        };
        q.uncommitted.remove(i);
        q.spilled = q.spilled.saturating_sub(1);
        q.spilled_bytes = q.spilled_bytes.saturating_sub(weight);
        if seq == q.spill_from {
            q.spill_head_enqueued = 0;
        }
        if q.spilled == 0 {
            q.spilled_bytes = 0;
            q.spill_from = q.next_seq;
        }
        let wake = q.items.is_empty();
        drop(q);
        if wake {
            self.notify.notify_one();
        }
        true
    }

    /// Reservations whose commit has not settled yet (hot and spilled). Each settles when
    /// the store runs its commit's effects, so this returns to 0 whenever the store is idle;
    /// a count that stays up is a leaked reservation (`tern_reservations_open`).
    pub fn open_reservations(&self) -> usize {
        self.counts().1
    }

    /// Queued messages ([`Outbox::len`]) and open reservations, under one lock (a scrape
    /// reads both for every session).
    pub fn counts(&self) -> (usize, usize) {
        let q = self.lock();
        (
            q.items.len() + q.pending + q.spilled,
            q.pending + q.uncommitted.len(),
        )
    }

    /// Bytes queued (memory, reserved and spilled, as the byte limit counts them) with
    /// [`Outbox::counts`], under one lock: `tern_queued_bytes` beside `tern_queued_messages`.
    pub fn counts_and_bytes(&self) -> (usize, usize, usize) {
        let q = self.lock();
        (
            q.items.len() + q.pending + q.spilled,
            q.pending + q.uncommitted.len(),
            q.bytes + q.pending_bytes + q.spilled_bytes,
        )
    }

    /// A spilled entry's commit completed: the loader may read up to it.
    pub fn spill_committed(&self, seq: u64, epoch: u64) {
        let mut q = self.lock();
        if q.epoch != epoch {
            return;
        }
        if let Some(i) = q.uncommitted.iter().position(|&s| s == seq) {
            q.uncommitted.remove(i);
        }
        let wake = q.items.is_empty();
        drop(q);
        if wake {
            self.notify.notify_one();
        }
    }

    /// Where the loader should read next: (from seq, below seq, epoch), when memory is drained
    /// and committed entries wait on disk.
    pub fn spill_window(&self) -> Option<(u64, u64, u64)> {
        let q = self.lock();
        if !q.items.is_empty() || q.spilled == 0 {
            return None;
        }
        let below = q.uncommitted.front().copied().unwrap_or(q.next_seq);
        (below > q.spill_from).then_some((q.spill_from, below, q.epoch))
    }

    /// Takes deliveries loaded from disk (ascending seqs within the spill window).
    pub fn load_spilled(&self, loaded: Vec<Delivery>, next_from: u64, epoch: u64) {
        let mut q = self.lock();
        if q.epoch != epoch {
            return;
        }
        for d in loaded {
            let w = d.msg.weight();
            q.spilled = q.spilled.saturating_sub(1);
            q.spilled_bytes = q.spilled_bytes.saturating_sub(w);
            q.bytes += w;
            q.items.push_back(d);
        }
        q.spill_from = q.spill_from.max(next_from);
        // The disk's new head is younger than what memory now holds: asked for when needed.
        q.spill_head_enqueued = 0;
        if q.spilled == 0 {
            q.spilled_bytes = 0;
        }
    }

    /// The committed on-disk part of the queue: (from seq, below seq, epoch), whatever memory
    /// holds. For the expiry sweep of sessions whose client is away.
    pub fn spill_head(&self) -> Option<(u64, u64, u64)> {
        let q = self.lock();
        if q.spilled == 0 {
            return None;
        }
        let below = q.uncommitted.front().copied().unwrap_or(q.next_seq);
        (below > q.spill_from).then_some((q.spill_from, below, q.epoch))
    }

    /// Drops `n` spilled entries of `bytes` from the head, which now starts at `next_from`;
    /// only if the head is still at `from` (nobody loaded or cleared it meanwhile).
    pub fn drop_spilled_head(
        &self,
        from: u64,
        next_from: u64,
        n: usize,
        bytes: usize,
        epoch: u64,
    ) -> bool {
        let mut q = self.lock();
        // Only while the client is away: an attached connection may be loading this head.
        if q.online || q.epoch != epoch || q.spill_from != from || n > q.spilled {
            return false;
        }
        q.spill_from = next_from;
        q.spill_head_enqueued = 0;
        q.spilled -= n;
        q.spilled_bytes = q.spilled_bytes.saturating_sub(bytes);
        if q.spilled == 0 {
            q.spilled_bytes = 0;
        }
        true
    }

    /// Accounts for spilled entries that turned out to be gone from disk (e.g. expired).
    pub fn forget_spilled(&self, n: usize) {
        let mut q = self.lock();
        q.spill_head_enqueued = 0;
        q.spilled = q.spilled.saturating_sub(n);
        if q.spilled == 0 {
            q.spilled_bytes = 0;
        }
    }

    /// Copies of the deliveries in memory, head first (the part of the queue not spilled),
    /// for handing a session to another node; the queue is not changed.
    pub fn memory_items(&self) -> Vec<Delivery> {
        self.lock().items.iter().cloned().collect()
    }

    /// Messages queued for this session, in memory and on disk.
    pub fn len(&self) -> usize {
        let q = self.lock();
        q.items.len() + q.pending + q.spilled
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the session (for a group: any member) is online.
    pub fn is_online(&self) -> bool {
        self.lock().online
    }

    /// Marks the session online (QoS 0 accepted) or offline.
    pub fn set_online(&self, online: bool) {
        self.lock().online = online;
        if online {
            self.notify.notify_one();
        }
    }

    /// Drops everything (a clean start); returns how many were queued. The durable copy is
    /// deleted by the caller (DeleteSession).
    pub fn clear(&self) -> usize {
        self.purge().0
    }

    /// Drops everything queued (an operator's purge, or a clean start) and returns how many,
    /// with the seq below which the store's entries are the dropped ones (the caller submits
    /// `Op::PurgeQueue` with it).
    pub fn purge(&self) -> (usize, u64) {
        let mut q = self.lock();
        let n = q.items.len() + q.pending + q.spilled;
        q.items.clear();
        q.bytes = 0;
        q.pending = 0;
        q.pending_bytes = 0;
        q.spilled = 0;
        q.spilled_bytes = 0;
        q.uncommitted.clear();
        q.spill_from = q.next_seq;
        q.spill_head_enqueued = 0;
        q.epoch += 1;
        q.early_refused = 0;
        (n, q.next_seq)
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
        Delivery::new(
            Arc::new(Message {
                id: 0,
                topic: MqttStr::from("t"),
                payload: Bytes::from_static(b"123456789"),
                qos,
                retain: false,
                properties: PublishProperties::default(),
                expires_at: None,
                origin: 0,
                received: None,
            }),
            qos,
            false,
            SubIds::None,
        )
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

    /// An early delivery (a cluster's fast copy) never overtakes what the queue holds
    /// elsewhere: not a pending commit, not the disk, not an early delivery refused before
    /// whose stream copy has not been queued yet.
    #[test]
    fn early_deliveries_never_overtake() {
        let o = Outbox::new(100, 1 << 20);
        let mut places = Vec::new();
        assert!(
            o.push_early(d(QoS::AtLeastOnce), true, 0, |s| places.push(s))
                .is_err(),
            "offline: refused"
        );
        o.early_settled(0);
        o.set_online(true);
        let (seq, epoch) = o
            .push_early(d(QoS::AtLeastOnce), true, 0, |s| places.push(s))
            .expect("attached, nothing waiting: taken");
        assert_eq!((seq, epoch), (Some(1), 0));
        assert_eq!(places, [1], "the place is known before it is visible");
        let mut out = Vec::new();
        o.pop_batch(10, 10, &mut out);
        assert_eq!(out[0].early, Some(1));
        // A reservation waiting for its commit: refused, and so is the next one until the
        // refused one's stream copy is queued.
        let Reservation::Hot { seq: 2, epoch: 0 } = o.reserve(10) else {
            panic!("hot reservation expected");
        };
        assert_eq!(o.push_early(d(QoS::AtLeastOnce), true, 0, |_| {}), Err(0));
        o.push_reserved(d(QoS::AtLeastOnce), 0);
        assert_eq!(
            o.push_early(d(QoS::AtLeastOnce), true, 0, |_| {}),
            Err(0),
            "an earlier refusal is outstanding"
        );
        o.early_settled(0);
        o.early_settled(0);
        assert_eq!(
            o.push_early(d(QoS::AtLeastOnce), false, 0, |_| panic!(
                "no place without a store"
            )),
            Ok((None, 0))
        );
        // A clean start forgets outstanding refusals.
        assert!(o.push_early(d(QoS::AtLeastOnce), true, 0, |_| {}).is_ok());
        o.reserve(10);
        assert!(o.push_early(d(QoS::AtLeastOnce), true, 0, |_| {}).is_err());
        o.clear();
        assert!(o.push_early(d(QoS::AtLeastOnce), true, 0, |_| {}).is_ok());
        // A subscription made while fast copy 5 was next: none until 5 is settled.
        o.early_after(5);
        assert!(o.push_early(d(QoS::AtLeastOnce), true, 4, |_| {}).is_err());
        o.early_settled(1);
        assert!(o.push_early(d(QoS::AtLeastOnce), true, 5, |_| {}).is_ok());
    }

    #[test]
    fn fits_counts_what_is_queued_against_both_limits() {
        let o = Outbox::new(3, 100);
        assert!(o.fits(3, 100));
        assert!(!o.fits(4, 10), "message limit");
        assert!(!o.fits(1, 101), "byte limit");
        assert!(matches!(
            o.reserve(40),
            Reservation::Hot { .. } | Reservation::Spill { .. }
        ));
        assert!(o.fits(2, 60));
        assert!(!o.fits(3, 10));
        assert!(!o.fits(1, 61));
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

    /// Consumer lag: the oldest age follows the head (memory first, then what the disk's head
    /// was when it was spilled, else "ask the store"), and the latency average moves by an
    /// eighth of each difference.
    #[test]
    fn the_oldest_waiting_message_and_the_latency_average() {
        let o = Outbox::new(100, 1 << 20);
        assert_eq!(o.oldest(), Oldest::Nothing);
        // Client away: everything spills; the first spilled entry's time is kept.
        let Reservation::Spill { seq, epoch } = o.reserve_with(10, false, 1_000) else {
            panic!()
        };
        assert!(matches!(
            o.reserve_with(10, false, 1_005),
            Reservation::Spill { .. }
        ));
        o.spill_committed(seq, epoch);
        assert_eq!(o.oldest(), Oldest::Enqueued(1_000));
        // Loaded into memory: memory's head answers; the disk's new head is not known here.
        let mut first = d(QoS::AtLeastOnce);
        first.enqueued = 1_000;
        o.load_spilled(vec![first], seq + 1, epoch);
        assert_eq!(o.oldest(), Oldest::Enqueued(1_000));
        let mut out = Vec::new();
        o.pop_batch(10, 10, &mut out);
        assert_eq!(o.oldest(), Oldest::OnDisk(seq + 1));
        o.spill_head_read(seq + 1, 1_005);
        assert_eq!(o.oldest(), Oldest::Enqueued(1_005));
        assert!(!o.oldest_on_disk());
        // A retained message sent on subscribe (no enqueue time) is skipped.
        o.set_online(true);
        o.clear();
        o.push(d(QoS::AtLeastOnce));
        let mut routed = d(QoS::AtLeastOnce);
        routed.enqueued = 2_000;
        o.push(routed);
        assert_eq!(o.oldest(), Oldest::Enqueued(2_000));

        assert_eq!(o.latency(), None);
        o.acknowledged(Duration::from_millis(800));
        assert_eq!(o.latency(), Some(Duration::from_millis(800)));
        o.acknowledged(Duration::from_millis(0));
        // 0 counts as 1 µs (0 means "none yet").
        assert_eq!(o.latency(), Some(Duration::from_micros(700_001)));
        for _ in 0..200 {
            o.acknowledged(Duration::from_secs(10));
        }
        let avg = o.latency().expect("some");
        assert!(
            avg > Duration::from_millis(9_900) && avg <= Duration::from_secs(10),
            "{avg:?}"
        );
    }

    #[test]
    fn reservations_go_hot_then_spill_and_load_in_order() {
        let o = Outbox::new(10_000, 1 << 30);
        o.set_online(true);
        let mut hot = Vec::new();
        for _ in 0..HOT_MAX {
            match o.reserve(10) {
                Reservation::Hot { seq, epoch } => hot.push((seq, epoch)),
                other => panic!("{other:?}"),
            }
        }
        let Reservation::Spill { seq: s1, epoch } = o.reserve(10) else {
            panic!()
        };
        let Reservation::Spill { seq: s2, .. } = o.reserve(10) else {
            panic!()
        };
        assert_eq!(o.len(), HOT_MAX + 2);
        // Nothing to load while memory holds messages.
        for (seq, epoch) in &hot {
            let mut dl = d(QoS::AtLeastOnce);
            dl.seq = Some(*seq);
            o.push_reserved(dl, *epoch);
        }
        assert_eq!(o.spill_window(), None);
        let mut out = Vec::new();
        o.pop_batch(usize::MAX, usize::MAX, &mut out);
        assert_eq!(out.len(), HOT_MAX);
        // s1 not committed yet: the loader must not read past it.
        assert_eq!(o.spill_window(), None);
        o.spill_committed(s1, epoch);
        assert_eq!(o.spill_window(), Some((s1, s2, epoch)));
        o.spill_committed(s2, epoch);
        assert_eq!(o.spill_window(), Some((s1, s2 + 1, epoch)));
        o.load_spilled(
            vec![d(QoS::AtLeastOnce), d(QoS::AtLeastOnce)],
            s2 + 1,
            epoch,
        );
        assert_eq!(o.len(), 2);
        assert_eq!(o.spill_window(), None);
        // Caught up: the next reservation is hot again.
        assert!(matches!(o.reserve(10), Reservation::Hot { .. }));
    }

    #[test]
    fn offline_reservations_spill_and_clear_invalidates() {
        let o = Outbox::new(3, 1 << 30);
        assert!(matches!(o.reserve(1), Reservation::Spill { .. }));
        assert!(matches!(o.reserve(1), Reservation::Spill { .. }));
        let Reservation::Spill { seq, epoch } = o.reserve(1) else {
            panic!()
        };
        assert_eq!(o.reserve(1), Reservation::Full);
        assert_eq!(o.clear(), 3);
        o.spill_committed(seq, epoch); // stale: ignored
        assert_eq!(o.len(), 0);
        assert_eq!(o.spill_window(), None);
    }

    #[test]
    fn expired_head_is_dropped_only_while_offline_and_unchanged() {
        let o = Outbox::new(100, 1 << 30);
        o.restore(SpillState {
            head: 5,
            next_seq: 9,
            len: 4,
            bytes: 40,
        });
        let (from, below, epoch) = o.spill_head().unwrap();
        assert_eq!((from, below), (5, 9));
        assert!(!o.drop_spilled_head(4, 7, 2, 20, epoch), "stale head");
        o.set_online(true);
        assert!(!o.drop_spilled_head(5, 7, 2, 20, epoch), "client attached");
        o.set_online(false);
        assert!(o.drop_spilled_head(5, 7, 2, 20, epoch));
        assert_eq!(o.len(), 2);
        assert_eq!(o.spill_head(), Some((7, 9, epoch)));
    }

    #[test]
    fn restored_queue_is_all_on_disk() {
        let o = Outbox::new(100, 1 << 30);
        o.restore(SpillState {
            head: 5,
            next_seq: 9,
            len: 3,
            bytes: 30,
        });
        assert_eq!(o.len(), 3);
        assert_eq!(o.spill_window(), Some((5, 9, 0)));
        assert!(matches!(o.reserve(1), Reservation::Spill { seq: 9, .. }));
    }

    #[test]
    fn pop_if_requeue_and_back_pressure_threshold() {
        let o = Outbox::new(8, 1 << 20);
        for _ in 0..6 {
            o.push(d(QoS::AtLeastOnce));
        }
        assert!(
            !o.drained_and_above(3, 4),
            "nobody drains it: no back-pressure"
        );
        o.set_online(true);
        assert!(o.drained_and_above(3, 4), "6 of 8");
        assert!(matches!(o.pop_if(|_| false), Popped::Refused));
        let Popped::Item(first) = o.pop_if(|_| true) else {
            panic!("front")
        };
        let Popped::Item(second) = o.pop_if(|_| true) else {
            panic!("front")
        };
        assert!(!o.drained_and_above(3, 4), "4 of 8");
        assert!(o.drained_and_above(1, 2));
        o.requeue_front(vec![first, second].into_iter());
        assert_eq!(o.len(), 6);
        // Forced reservations ignore the limits (a message accepted once coming back).
        for _ in 0..2 {
            o.push(d(QoS::AtLeastOnce));
        }
        assert_eq!(o.reserve(1), Reservation::Full);
        assert!(matches!(
            o.reserve_with(1, true, 0),
            Reservation::Hot { .. }
        ));
        let mut all = Vec::new();
        o.pop_batch(100, 100, &mut all);
        assert_eq!(all.len(), 8);
        assert!(matches!(o.pop_if(|_| true), Popped::Empty));
    }

    #[test]
    fn failed_reservations_are_released_and_the_loader_reads_past_them() {
        let o = Outbox::new(100, 1 << 30);
        o.set_online(true);
        let Reservation::Hot { epoch, .. } = o.reserve(10) else {
            panic!("hot")
        };
        assert_eq!(o.open_reservations(), 1);
        assert!(o.release_reserved(10, epoch));
        assert_eq!((o.open_reservations(), o.len()), (0, 0));
        // Offline: three spilled entries, the middle one's commit fails.
        o.set_online(false);
        let seqs: Vec<u64> = (0..3)
            .map(|_| match o.reserve(10) {
                Reservation::Spill { seq, .. } => seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(o.open_reservations(), 3);
        o.spill_committed(seqs[0], epoch);
        assert!(o.release_spilled(seqs[1], 10, epoch));
        assert!(!o.release_spilled(seqs[1], 10, epoch), "released once only");
        // The loader stops before the third (still uncommitted), not at the failed one.
        assert_eq!(o.spill_window(), Some((seqs[0], seqs[2], epoch)));
        o.spill_committed(seqs[2], epoch);
        assert_eq!(o.spill_window(), Some((seqs[0], seqs[2] + 1, epoch)));
        assert_eq!((o.open_reservations(), o.len()), (0, 2));
        // A release after a clean start is stale: nothing to give back.
        let Reservation::Spill { seq, epoch } = o.reserve(10) else {
            panic!("spill")
        };
        o.clear();
        assert!(!o.release_spilled(seq, 10, epoch));
        assert_eq!(o.open_reservations(), 0);
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
