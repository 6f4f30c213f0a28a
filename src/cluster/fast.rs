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
//! for at most [`FORGET`]; an entry whose other copy never comes is dropped then. A fast copy
//! that was lost lets its stream copy reach clean sessions (and persistent sessions taking
//! early deliveries) after later messages of its topic that came the fast way: ordering holds
//! except around such a loss. Only QoS 1: a QoS 2 message delivered through the fast path
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
/// (`broker/early.rs`), for its stream copy to settle.
#[derive(Default)]
pub(crate) struct Seen {
    waiting: Mutex<HashMap<String, Waiting>>,
}

/// One copy waiting for the other: which, since when, and what a fast copy routed.
type Waiting = (Side, Instant, Option<FastBatch>);

impl Seen {
    /// The fast copy of `id` arrived: routes it with `route` unless the stream copy came
    /// first, and returns whether it did. `route` runs under the lock, so a stream copy
    /// arriving meanwhile finds every early delivery it made.
    pub(crate) fn fast(&self, id: &str, now: Instant, route: impl FnOnce() -> FastBatch) -> bool {
        let mut w = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        match w.remove(id) {
            Some((Side::Stream, _, _)) => false,
            _ => {
                let batch = route();
                w.insert(id.to_string(), (Side::Fast, now, Some(batch)));
                true
            }
        }
    }

    /// The stream copy of `id` arrived: None when it is first (it goes to everyone), else
    /// the early deliveries its fast copy made (it goes to the other persistent sessions).
    pub(crate) fn stream(&self, id: &str, now: Instant) -> Option<FastBatch> {
        let mut w = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        match w.remove(id) {
            Some((Side::Fast, _, batch)) => batch,
            _ => {
                w.insert(id.to_string(), (Side::Stream, now, None));
                None
            }
        }
    }

    /// Forgets what waited longer than [`FORGET`] (its other copy is not coming).
    /// Returns the fast copies forgotten, for [`crate::broker::Broker::forget_fast`].
    pub(crate) fn forget_old(&self, now: Instant) -> Vec<FastBatch> {
        let mut w = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let old: Vec<String> = w
            .iter()
            .filter(|(_, (_, at, _))| now.duration_since(*at) >= FORGET)
            .map(|(id, _)| id.clone())
            .collect();
        old.into_iter()
            .filter_map(|id| w.remove(&id).and_then(|(_, _, batch)| batch))
            .collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
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
            if seen.fast(id.as_str(), now, || broker.publish_fast(&msgs)) {
                broker.metrics.cluster.in_fast.inc_by(msgs.len() as u64);
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(s.fast("a", t, FastBatch::default), "fast first: routed");
        assert!(
            s.stream("a", t).is_some(),
            "then the stream copy: the other persistent sessions, with the fast copy's batch"
        );
        assert_eq!(s.len(), 0);
        assert!(s.stream("b", t).is_none(), "stream first: everyone");
        assert!(
            !s.fast("b", t, || unreachable!("not routed")),
            "then the fast copy: nobody"
        );
        assert_eq!(s.len(), 0);
        // A stream copy again (a redelivery) after both: everyone again (at least once).
        assert!(s.stream("b", t).is_none());
        // Waiting copies are forgotten after FORGET.
        assert!(s.fast("c", t, FastBatch::default));
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
