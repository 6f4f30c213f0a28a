//! Deliveries made before their message was stored: a cluster node hands the fast copy of
//! another node's QoS 1 message (`cluster/fast.rs`) to an attached persistent session at once,
//! about a millisecond before the messages stream's copy arrives, and makes the delivery
//! durable when that copy comes.
//!
//! Why it is safe: the stream copy is the one that counts. Until this node's commit of it is
//! done, JetStream keeps it unacknowledged for this node's consumer, and the session's anchor
//! (`cluster/anchors.rs`) cannot move past a message still queued or in flight. So whatever
//! happens to this node before the stream copy is stored, the message comes again (at least
//! once, as QoS 1 allows). When the stream copy comes, the session either has acknowledged
//! the early delivery (nothing to store) or not (its entry is stored in the session's queue
//! at the place the early delivery took, or, if it was sent already, as an in-flight record
//! under its packet id and send order, so a restart re-sends it in its original order among
//! the others in flight [MQTT-4.6.0-1]).
//!
//! The races between the connection (sending it, the client's PUBACK) and the node
//! consumer's task (the stream copy) are settled by one [`EarlyLedger`] entry per delivery,
//! keyed by (session id, place):
//!
//! | state | it is sent | the stream copy comes | the PUBACK comes |
//! |---|---|---|---|
//! | `Unacked` (not sent) | `Unacked` (sent: packet id, order) | queue entry submitted: `Queued` | — |
//! | `Unacked` (sent) | — | in-flight record submitted: `InFlight` | `Acked` |
//! | `Acked` | — | nothing stored; the entry goes | — |
//! | `Queued` | the connection moves the entry to an in-flight record: `InFlight` | — | — |
//! | `InFlight` | — | — | the connection deletes the record; the entry goes |
//!
//! Each submit happens under the ledger's lock together with the state change, so whatever
//! finds the new state submits its own operation after that one: the store applies them in
//! that order. Without this, a delete could overtake the insert and leave a record that comes
//! back after a restart as a duplicate. (A delivery finished unsent, expired say, in state
//! `Queued` has its queue entry dequeued.)
//!
//! **Order.** An early delivery must not overtake a message of its topic that the session
//! gets from the stream. Two cases: a message the session could not take early (its queue had
//! something waiting elsewhere; the refusal blocks later early deliveries until that stream
//! copy is queued, [`crate::outbox::Outbox::push_early`]), and a message whose fast copy
//! came before the session's subscription did but whose stream copy comes after, so it is
//! routed to the session from the stream. For the second, fast copies are numbered
//! ([`FastBatch`]) and a subscription records the next number: its session takes no early
//! delivery until every fast copy before it has had its stream copy routed
//! ([`EarlyLedger::settled`]).
//!
//! Entries whose other half never comes are forgotten: `Acked` after [`FORGET_ACKED`] (its
//! stream copy, refused by JetStream, is not coming), the others after [`FORGET_OPEN`] (the
//! session went away without acknowledging). Forgetting a `Stored` entry whose PUBACK then
//! comes leaves the stored entry behind: the message comes once more after a restart.

use crate::outbox::SubIds;
use crate::protocol::QoS;
use crate::session::registry::SessionHandle;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long an acknowledged early delivery waits for its stream copy (as long as the cluster
/// remembers a fast copy waiting for its stream copy).
pub const FORGET_ACKED: Duration = Duration::from_secs(120);
/// How long an early delivery that is not acknowledged is remembered.
pub const FORGET_OPEN: Duration = Duration::from_secs(3600);
/// Entries beyond which a new one first forgets the old ones.
const SWEEP_ABOVE: usize = 4096;
/// At most one sweep this often: a ledger that legitimately holds many entries (many
/// sessions with full in-flight windows) must not be scanned on every delivery.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// One early delivery, as its stream copy needs it: whom it went to, where its stored copy
/// goes, and the per-subscriber fields of its queue entry.
#[derive(Clone)]
pub struct Early {
    pub session: Arc<SessionHandle>,
    /// The place in the session's durable queue; None with memory storage (nothing to store).
    pub seq: Option<u64>,
    /// The session queue's epoch when it was made (a clean start since voids it).
    pub epoch: u64,
    pub qos: QoS,
    pub retain: bool,
    pub sub_ids: SubIds,
}

/// A fast copy as routed here: its number among fast copies, and per message what its stream
/// copy must settle. Whoever holds it hands it to exactly one of
/// [`crate::broker::Broker::publish_stream_copy`] or [`crate::broker::Broker::forget_fast`].
#[derive(Default)]
pub struct FastBatch {
    pub(super) number: u64,
    pub routed: Vec<FastRouted>,
}

/// What a fast copy left for its stream copy, per message: the early deliveries to settle,
/// and the persistent sessions that refused one (they take no early delivery until this
/// stream copy is queued for them, [`crate::outbox::Outbox::early_settled`]).
#[derive(Default, Clone)]
pub struct FastRouted {
    pub early: Vec<Early>,
    pub refused: Vec<(Arc<SessionHandle>, u64)>,
}

impl FastRouted {
    /// The stream copy was queued (or will never come): the refusals are settled.
    pub fn settle_refused(&self) {
        for (session, epoch) in &self.refused {
            session.outbox.early_settled(*epoch);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Neither acknowledged nor stored; its packet id and send order once sent.
    Unacked(Option<(u16, u64)>),
    Acked,
    /// Stored as a queue entry of the stream copy's message `msg_id` (not sent then).
    Queued {
        msg_id: u64,
    },
    /// Stored as an in-flight record under this packet id.
    InFlight(u16),
}

/// What the stream copy does for one early delivery ([`EarlyLedger::take`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// Store its queue entry (not sent yet), then [`Taken::stored`].
    Queue,
    /// Store its in-flight record (sent under this packet id, in this send order), then
    /// [`Taken::stored`].
    InFlight { packet_id: u16, order: u64 },
    /// Nothing: acknowledged already, or nothing to store.
    Nothing,
}

/// What a connection does when an early delivery is finished ([`EarlyLedger::finished`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    Nothing,
    /// Dequeue its queue entry (finished unsent).
    Dequeue,
    /// Delete its in-flight record.
    DeleteInflight(u16),
}

/// The early deliveries whose PUBACK or stream copy is still to come, and the fast copies
/// whose stream copy is.
#[derive(Default)]
pub struct EarlyLedger {
    entries: Mutex<Entries>,
    fast: Mutex<FastCopies>,
    /// Every fast copy numbered below this has had its stream copy routed (or is forgotten).
    settled: AtomicU64,
    /// When the entries were last swept for old ones.
    swept: Mutex<Option<Instant>>,
}

type Entries = HashMap<(u64, u64), (State, Instant)>;

/// Numbers of fast copies: the next one, and those whose stream copy is still to come.
#[derive(Default)]
struct FastCopies {
    next: u64,
    waiting: BTreeSet<u64>,
}

/// The ledger, locked while a stream copy's queue entries are submitted.
pub struct Taken<'a> {
    entries: MutexGuard<'a, Entries>,
}

impl EarlyLedger {
    /// Numbers a fast copy about to be routed.
    pub(super) fn fast_begin(&self) -> u64 {
        let mut f = self.fast.lock().unwrap_or_else(PoisonError::into_inner);
        let n = f.next;
        f.next += 1;
        f.waiting.insert(n);
        self.settled.store(
            f.waiting.first().copied().unwrap_or(f.next),
            Ordering::SeqCst,
        );
        n
    }

    /// Fast copy `n`'s stream copy was routed (or will never come).
    pub(super) fn fast_end(&self, n: u64) {
        let mut f = self.fast.lock().unwrap_or_else(PoisonError::into_inner);
        f.waiting.remove(&n);
        self.settled.store(
            f.waiting.first().copied().unwrap_or(f.next),
            Ordering::SeqCst,
        );
    }

    /// The number the next fast copy gets: a subscription made now waits for every fast copy
    /// before it ([`crate::outbox::Outbox::early_after`]).
    pub fn fast_mark(&self) -> u64 {
        self.fast
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next
    }

    /// Every fast copy numbered below this has had its stream copy routed.
    pub fn settled(&self) -> u64 {
        self.settled.load(Ordering::SeqCst)
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An early delivery was made at `seq` of `session`'s queue.
    pub fn delivered(&self, session: u64, seq: u64, now: Instant) {
        let mut e = self.lock();
        if e.len() >= SWEEP_ABOVE {
            let mut last = self.swept.lock().unwrap_or_else(PoisonError::into_inner);
            if last.is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY) {
                *last = Some(now);
                forget_old(&mut e, now);
            }
        }
        e.insert((session, seq), (State::Unacked(None), now));
    }

    /// The session's connection sent the early delivery at `seq` under `packet_id`, `order`
    /// in its send order. Returns the stored message's id when its queue entry is stored
    /// already: the connection then moves it to an in-flight record (dequeue, put in flight),
    /// as it does for any stored delivery it sends.
    pub fn sent(&self, session: u64, seq: u64, packet_id: u16, order: u64) -> Option<u64> {
        let mut e = self.lock();
        let (state, _) = e.get_mut(&(session, seq))?;
        match *state {
            State::Unacked(None) => {
                *state = State::Unacked(Some((packet_id, order)));
                None
            }
            State::Queued { msg_id } => {
                *state = State::InFlight(packet_id);
                Some(msg_id)
            }
            _ => None,
        }
    }

    /// The session finished the early delivery at `seq` (PUBACK, or dropped unsent): what
    /// its stored form, if any, needs now.
    pub fn finished(&self, session: u64, seq: u64, now: Instant) -> Finished {
        let mut e = self.lock();
        match e.get(&(session, seq)).map(|(s, _)| *s) {
            Some(State::Unacked(_)) => {
                e.insert((session, seq), (State::Acked, now));
                Finished::Nothing
            }
            Some(State::Queued { .. }) => {
                e.remove(&(session, seq));
                Finished::Dequeue
            }
            Some(State::InFlight(packet_id)) => {
                e.remove(&(session, seq));
                Finished::DeleteInflight(packet_id)
            }
            Some(State::Acked) | None => Finished::Nothing,
        }
    }

    /// Locks the ledger for a stream copy: decide with [`Taken::pending`], submit, then mark
    /// with [`Taken::stored`] before letting go.
    pub fn take(&self) -> Taken<'_> {
        Taken {
            entries: self.lock(),
        }
    }

    /// Entries remembered (for tests and the status of the ledger).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops the entries older than their state's time to be forgotten.
fn forget_old(e: &mut Entries, now: Instant) {
    e.retain(|_, (state, at)| {
        let age = now.saturating_duration_since(*at);
        age < if *state == State::Acked {
            FORGET_ACKED
        } else {
            FORGET_OPEN
        }
    });
}

impl Taken<'_> {
    /// What the stream copy does for `early`; `current` says whether its session's queue is
    /// still of the epoch it was made in (read before taking the ledger: the lock order is
    /// outbox, then ledger). An acknowledged delivery's entry goes; one the ledger no longer
    /// knows (forgotten) or whose session started clean since stores nothing.
    pub fn pending(&mut self, early: &Early, current: bool) -> Pending {
        let Some(seq) = early.seq else {
            return Pending::Nothing;
        };
        let key = (early.session.id, seq);
        match self.entries.get(&key).map(|(s, _)| *s) {
            Some(State::Unacked(None)) if current => Pending::Queue,
            Some(State::Unacked(Some((packet_id, order)))) if current => {
                Pending::InFlight { packet_id, order }
            }
            Some(State::Unacked(_)) | Some(State::Acked) => {
                self.entries.remove(&key);
                Pending::Nothing
            }
            Some(State::Queued { .. }) | Some(State::InFlight(_)) | None => Pending::Nothing,
        }
    }

    /// `early`'s stored form, as `pending` said, was submitted for message `msg_id` (still
    /// under the lock).
    pub fn stored(&mut self, early: &Early, how: Pending, msg_id: u64, now: Instant) {
        let state = match how {
            Pending::Queue => State::Queued { msg_id },
            Pending::InFlight { packet_id, .. } => State::InFlight(packet_id),
            Pending::Nothing => return,
        };
        if let Some(seq) = early.seq {
            self.entries.insert((early.session.id, seq), (state, now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Outbox;

    fn early(id: u64, seq: u64) -> Early {
        let session = Arc::new(SessionHandle::new(
            id,
            Arc::from("c"),
            Outbox::new(100, 1 << 20),
            true,
        ));
        Early {
            session,
            seq: Some(seq),
            epoch: 0,
            qos: QoS::AtLeastOnce,
            retain: false,
            sub_ids: SubIds::None,
        }
    }

    /// Every order of the PUBACK and the stream copy stores the entry iff it was not
    /// acknowledged first, and dequeues it iff it was stored.
    #[test]
    fn puback_and_stream_copy_in_either_order() {
        let l = EarlyLedger::default();
        let t = Instant::now();
        // Sent, PUBACK, then the stream copy: nothing stored, nothing to delete.
        let a = early(1, 7);
        l.delivered(1, 7, t);
        assert_eq!(l.sent(1, 7, 11, 1), None);
        assert_eq!(l.finished(1, 7, t), Finished::Nothing);
        assert_eq!(l.take().pending(&a, true), Pending::Nothing);
        assert!(l.is_empty());
        // Stream copy before it is sent: a queue entry, moved in flight when sent, deleted by
        // the PUBACK.
        let b = early(1, 8);
        l.delivered(1, 8, t);
        {
            let mut taken = l.take();
            assert_eq!(taken.pending(&b, true), Pending::Queue);
            taken.stored(&b, Pending::Queue, 99, t);
        }
        assert_eq!(
            l.sent(1, 8, 12, 2),
            Some(99),
            "move the entry of message 99 in flight"
        );
        assert_eq!(l.finished(1, 8, t), Finished::DeleteInflight(12));
        assert!(l.is_empty());
        assert_eq!(l.finished(1, 8, t), Finished::Nothing, "a repeated PUBACK");
        // Sent, then the stream copy: an in-flight record with its packet id and order.
        let c = early(1, 9);
        l.delivered(1, 9, t);
        assert_eq!(l.sent(1, 9, 13, 3), None);
        {
            let mut taken = l.take();
            let how = taken.pending(&c, true);
            assert_eq!(
                how,
                Pending::InFlight {
                    packet_id: 13,
                    order: 3
                }
            );
            taken.stored(&c, how, 100, t);
        }
        assert_eq!(l.finished(1, 9, t), Finished::DeleteInflight(13));
        // Stored unsent, then finished unsent (expired): dequeued.
        let d = early(1, 10);
        l.delivered(1, 10, t);
        {
            let mut taken = l.take();
            taken.stored(&d, Pending::Queue, 101, t);
        }
        assert_eq!(l.finished(1, 10, t), Finished::Dequeue);
        assert!(l.is_empty());
    }

    /// The settled mark is the oldest fast copy still waiting for its stream copy.
    #[test]
    fn settled_is_the_oldest_fast_copy_waiting() {
        let l = EarlyLedger::default();
        assert_eq!((l.settled(), l.fast_mark()), (0, 0));
        let a = l.fast_begin();
        let b = l.fast_begin();
        assert_eq!((l.settled(), l.fast_mark()), (a, 2));
        l.fast_end(b);
        assert_eq!(l.settled(), a, "a still waits");
        l.fast_end(a);
        assert_eq!(l.settled(), 2, "nothing waits");
    }

    #[test]
    fn a_clean_start_or_memory_storage_stores_nothing() {
        let l = EarlyLedger::default();
        let t = Instant::now();
        let a = early(2, 1);
        l.delivered(2, 1, t);
        a.session.outbox.clear();
        let current = a.session.outbox.epoch() == a.epoch;
        assert_eq!(
            l.take().pending(&a, current),
            Pending::Nothing,
            "epoch moved on"
        );
        let mut b = early(3, 1);
        b.seq = None;
        assert_eq!(l.take().pending(&b, true), Pending::Nothing);
        assert!(l.is_empty());
    }

    #[test]
    fn old_entries_are_forgotten_when_the_ledger_grows() {
        let l = EarlyLedger::default();
        let t = Instant::now();
        for seq in 0..SWEEP_ABOVE as u64 {
            l.delivered(4, seq, t);
            if seq % 2 == 0 {
                let _ = l.finished(4, seq, t);
            }
        }
        l.delivered(5, 1, t + FORGET_ACKED);
        assert_eq!(l.len(), SWEEP_ABOVE / 2 + 1, "acknowledged ones forgotten");
        // Old enough to go, but the last sweep was less than SWEEP_EVERY ago.
        for seq in 0..SWEEP_ABOVE as u64 {
            l.delivered(6, seq, t);
            let _ = l.finished(6, seq, t);
        }
        l.delivered(5, 3, t + FORGET_ACKED + SWEEP_EVERY / 2);
        assert!(l.len() > SWEEP_ABOVE, "no second sweep within SWEEP_EVERY");
        l.delivered(5, 4, t + FORGET_ACKED + SWEEP_EVERY);
        assert_eq!(l.len(), SWEEP_ABOVE / 2 + 3, "swept again");
        forget_old(&mut l.lock(), t + FORGET_OPEN);
        assert_eq!(l.len(), 3, "open ones after FORGET_OPEN");
    }
}
