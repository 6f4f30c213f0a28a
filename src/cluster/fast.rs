//! The fast path for QoS 1: a copy of each all-QoS-1 batch over core NATS, besides the
//! stream.
//!
//! Through the stream a message reaches another node only after JetStream stored it with
//! its replicas and handed it to that node's consumer: about a millisecond more than a core
//! NATS hop. So the forwarder also publishes each batch whose messages are all QoS 1 on the
//! core subject `P.fast`, and a receiving node routes that copy at once
//! ([`Targets::Fast`](crate::broker::Targets)): to its clean sessions, which have no position
//! in the stream to keep, and to the persistent sessions that can take it before it is
//! stored (attached, nothing of their queue waiting elsewhere), as *early deliveries*
//! (`broker/early.rs`). When the stream copy comes, it goes to the other persistent sessions,
//! and stores the early deliveries not acknowledged yet. The stream stays the path that
//! guarantees delivery: a fast copy that is lost (core NATS is at most once) is noticed when
//! the stream copy comes without one, which then goes to everyone.
//!
//! | first to arrive | then | routed |
//! |---|---|---|
//! | fast copy | stream copy | fast → clean sessions and early deliveries; stream → the other persistent sessions, and stores the unacknowledged early ones |
//! | stream copy | fast copy | stream → everyone; fast → nobody |
//! | stream copy | (fast copy lost) | stream → everyone |
//! | fast copy | (stream copy never: JetStream refused, the publisher was refused) | fast → clean sessions and early deliveries: delivered, not acknowledged, as a single node delivers to clean sessions before its commit |
//!
//! The two copies carry the same id (the stream's deduplication id), and the stream copy
//! says that a fast copy exists ([`MARK`]). What one side saw waits for the other in [`Seen`]
//! for at most [`FORGET`]; an entry whose other copy never comes is dropped then. Order
//! holds across the two paths: a fast copy is routed only after every earlier batch of its
//! sender ([`Order`]). Only QoS 1: a QoS 2 message delivered through the fast path
//! whose stream publish then failed would come again as a new message when its publisher
//! sends it again, which exactly once does not allow.

use super::{wire, ClusterError, Names};
use crate::broker::early::FastBatch;
use crate::broker::Broker;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// How long one copy's arrival is remembered waiting for the other.
const FORGET: Duration = Duration::from_secs(120);
/// Header naming a copy's id on the fast path (the stream copy has `Nats-Msg-Id`).
pub(crate) const ID: &str = "Tern-Id";
/// Header of a stream copy that has a fast copy: only such a stream copy waits in [`Seen`]
/// for its fast copy (a node with `fast_path = false` sends none, and what waits for
/// nothing would fill the map for [`FORGET`]).
pub(crate) const MARK: &str = "Tern-Fast";
/// JetStream's deduplication header, kept on the stored message.
const MSG_ID: &str = "Nats-Msg-Id";

/// The subject of fast copies.
pub(crate) fn subject(names: &Names) -> String {
    format!("{}.fast", names.prefix)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Fast,
    Stream,
}

/// Which copy of which batch arrived first and is waiting for the other; a fast copy that
/// came first also leaves the early deliveries it made to persistent sessions, per message
/// (`broker/early.rs`), for its stream copy to settle. And, per sending node, how far its
/// batches have been routed here, which keeps a fast copy from overtaking (see [`Order`]).
#[derive(Default)]
pub(crate) struct Seen {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    waiting: HashMap<String, Waiting>,
    senders: HashMap<String, Order>,
}

/// One copy waiting for the other: which, since when, and what a fast copy routed (None: it
/// arrived out of order and was not routed; its stream copy goes to everyone).
type Waiting = (Side, Instant, Option<FastBatch>);

/// How far one sending node's batches (numbered by its forwarder, header [`wire::SEQ`]) have
/// been routed here. A fast copy may be routed only when every earlier batch of its sender
/// has been: the previous one by its own fast copy, or all of them by their stream copies.
/// Otherwise an earlier batch still to come through the stream (sent without a fast copy
/// under load, or whose fast copy was lost or dropped by a full subscription) would reach
/// its subscribers after this one, and a topic's messages must keep their order. Such a fast
/// copy is not routed; its stream copy goes to everyone.
#[derive(Default)]
struct Order {
    last_fast: Option<u64>,
    stream_upto: u64,
    at: Option<Instant>,
}

impl Order {
    fn fast_may_go(&self, n: u64) -> bool {
        self.last_fast == Some(n.wrapping_sub(1)) || self.stream_upto.saturating_add(1) >= n
    }
}

impl Seen {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fast copy of `id` (batch `seq` of its sender, when it says) arrived: routes it with
    /// `route` unless the stream copy came first or an earlier batch of its sender is still
    /// to come through the stream, and returns whether it did. `route` runs under the lock,
    /// so a stream copy arriving meanwhile finds every early delivery it made.
    pub(crate) fn fast(
        &self,
        id: &str,
        seq: Option<(&str, u64)>,
        now: Instant,
        route: impl FnOnce() -> FastBatch,
    ) -> bool {
        let mut g = self.lock();
        let g = &mut *g;
        if let Some((Side::Stream, _, _)) = g.waiting.remove(id) {
            return false;
        }
        let order = seq.map(|(sender, n)| {
            let o = g.senders.entry(sender.to_string()).or_default();
            o.at = Some(now);
            (o, n)
        });
        if let Some((o, n)) = &order {
            if !o.fast_may_go(*n) {
                g.waiting.insert(id.to_string(), (Side::Fast, now, None));
                return false;
            }
        }
        if let Some((o, n)) = order {
            o.last_fast = Some(n);
        }
        let batch = route();
        g.waiting
            .insert(id.to_string(), (Side::Fast, now, Some(batch)));
        true
    }

    /// The stream copy of `id` arrived: None when it goes to everyone (it is first, or its
    /// fast copy was not routed), else the early deliveries its fast copy made (it goes to
    /// the other persistent sessions).
    pub(crate) fn stream(&self, id: &str, now: Instant) -> Option<FastBatch> {
        let mut g = self.lock();
        match g.waiting.remove(id) {
            Some((Side::Fast, _, batch)) => batch,
            _ => {
                g.waiting.insert(id.to_string(), (Side::Stream, now, None));
                None
            }
        }
    }

    /// A stream copy, batch `seq` of its sender, has been routed here (every stream copy,
    /// with a fast copy or not; after its routing, so that a fast copy let through by it
    /// comes after it).
    pub(crate) fn streamed(&self, seq: Option<(&str, u64)>, now: Instant) {
        let Some((sender, n)) = seq else {
            return;
        };
        let mut g = self.lock();
        let o = g.senders.entry(sender.to_string()).or_default();
        o.stream_upto = o.stream_upto.max(n);
        o.at = Some(now);
    }

    /// Forgets what waited longer than [`FORGET`] (its other copy is not coming), and
    /// senders not heard from for as long (a node's earlier run).
    /// Returns the fast copies forgotten, for [`crate::broker::Broker::forget_fast`].
    pub(crate) fn forget_old(&self, now: Instant) -> Vec<FastBatch> {
        let mut g = self.lock();
        g.senders
            .retain(|_, o| o.at.is_some_and(|at| now.duration_since(at) < FORGET));
        let old: Vec<String> = g
            .waiting
            .iter()
            .filter(|(_, (_, at, _))| now.duration_since(*at) >= FORGET)
            .map(|(id, _)| id.clone())
            .collect();
        old.into_iter()
            .filter_map(|id| g.waiting.remove(&id).and_then(|(_, _, batch)| batch))
            .collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().waiting.len()
    }
}

/// The id of a stream copy that has a fast copy (its sender said so with [`MARK`]).
pub(crate) fn has_fast_copy(headers: Option<&async_nats::HeaderMap>) -> Option<&str> {
    let h = headers?;
    h.get(MARK)?;
    h.get(MSG_ID).map(|v| v.as_str())
}

/// Routes the fast copies of other nodes' batches to this node's clean sessions and, early,
/// to the persistent sessions that can take them.
pub(crate) async fn receive(
    broker: Arc<Broker>,
    client: async_nats::Client,
    names: &Names,
    node: String,
    seen: Arc<Seen>,
) -> Result<JoinHandle<()>, ClusterError> {
    let mut sub = client
        .subscribe(subject(names))
        .await
        .map_err(|e| ClusterError::JetStream(format!("subscribe: {e}")))?;
    Ok(tokio::spawn(async move {
        let mut last_forget = Instant::now();
        while let Some(m) = sub.next().await {
            let now = Instant::now();
            if now.duration_since(last_forget) > FORGET / 4 {
                for batch in seen.forget_old(now) {
                    // Its stream copy is not coming: what it holds back is let go.
                    broker.forget_fast(batch);
                }
                last_forget = now;
            }
            if wire::from_node(m.headers.as_ref(), &node) {
                continue;
            }
            let Some(id) = m.headers.as_ref().and_then(|h| h.get(ID)) else {
                continue;
            };
            // Decoded before it counts as routed: a copy that cannot be routed leaves its
            // clean sessions to the stream copy.
            let next = || broker.next_message_id();
            let Some(msgs) = wire::decode_all(m.headers.as_ref(), &m.payload, next, false) else {
                tracing::warn!(subject = %m.subject, "undecodable cluster message dropped");
                continue;
            };
            let seq = wire::seq_of(m.headers.as_ref());
            if seen.fast(id.as_str(), seq, now, || broker.publish_fast(&msgs)) {
                broker.metrics.cluster.in_fast.inc_by(msgs.len() as u64);
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fast copy goes only after every earlier batch of its sender has gone here, by its
    /// fast copy or by its stream copy; one that would overtake is left to its stream copy.
    #[test]
    fn a_fast_copy_never_overtakes_an_earlier_batch() {
        let s = Seen::default();
        let t = Instant::now();
        let go = |id: &str, n: u64| s.fast(id, Some(("t1.7", n)), t, FastBatch::default);
        assert!(go("1", 1), "the first batch of a sender");
        assert!(go("2", 2), "right after a routed fast copy");
        // Batch 3 left without a fast copy (or it was lost): 4 must wait for 3's stream copy.
        assert!(!go("4", 4), "would overtake batch 3");
        assert!(
            s.stream("4", t).is_none(),
            "its stream copy goes to everyone"
        );
        for n in 1..=3 {
            s.streamed(Some(("t1.7", n)), t);
        }
        assert!(!go("5", 5), "4 has not been routed by either path yet");
        s.streamed(Some(("t1.7", 4)), t);
        assert!(go("5", 5), "everything before 5 routed by the stream");
        assert!(go("6", 6), "right after a routed fast copy");
        // Another sender is not held back by this one.
        assert!(!s.fast("x", Some(("t2.9", 40)), t, FastBatch::default));
        s.streamed(Some(("t2.9", 39)), t);
        assert!(s.fast("y", Some(("t2.9", 40)), t, FastBatch::default));
        // Senders not heard from for FORGET are forgotten.
        s.forget_old(t + FORGET);
        assert!(s.lock().senders.is_empty());
    }

    #[test]
    fn only_a_marked_stream_copy_waits_for_a_fast_one() {
        let mut h = async_nats::HeaderMap::new();
        h.insert(MSG_ID, "t1.9.42");
        assert_eq!(has_fast_copy(Some(&h)), None, "not marked: no fast copy");
        h.insert(MARK, "1");
        assert_eq!(has_fast_copy(Some(&h)), Some("t1.9.42"));
        assert_eq!(has_fast_copy(None), None);
    }

    /// Every order of arrival routes each copy to the right sessions, once.
    #[test]
    fn whichever_copy_comes_first_the_other_is_matched() {
        let s = Seen::default();
        let t = Instant::now();
        assert!(
            s.fast("a", None, t, FastBatch::default),
            "fast first: routed"
        );
        assert!(
            s.stream("a", t).is_some(),
            "then the stream copy: the other persistent sessions, with the fast copy's batch"
        );
        assert_eq!(s.len(), 0);
        assert!(s.stream("b", t).is_none(), "stream first: everyone");
        assert!(
            !s.fast("b", None, t, || unreachable!("not routed")),
            "then the fast copy: nobody"
        );
        assert_eq!(s.len(), 0);
        // A stream copy again (a redelivery) after both: everyone again (at least once).
        assert!(s.stream("b", t).is_none());
        // Waiting copies are forgotten after FORGET.
        assert!(s.fast("c", None, t, FastBatch::default));
        s.forget_old(t + FORGET / 2);
        assert_eq!(s.len(), 2, "b (stream) and c (fast) wait");
        s.forget_old(t + FORGET);
        assert_eq!(s.len(), 0);
        assert!(
            s.stream("c", t + FORGET).is_none(),
            "its fast copy forgotten: everyone"
        );
    }
}
