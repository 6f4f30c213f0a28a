//! Where a persistent session can be found again when its node is gone: its *anchor*, one
//! key per client id in the sessions bucket, holding the node that has the session, its
//! subscriptions, and a position `low` in the messages stream such that every QoS 1/2
//! message the session has not finished with was published after `low`.
//!
//! With the anchor, another node can rebuild the session of a node that died: the
//! subscriptions from the anchor, the queue by reading the stream from `low` on through
//! those subscriptions (`sessions.rs`). Delivery is then at least once: what the client had
//! already acknowledged after `low` comes again (QoS 2 included, which degrades to at least
//! once across a node's death; its exchange state died with the node).
//!
//! How `low` stays exact: a connection that finds its session drained (nothing queued,
//! nothing in flight) records the node's stream position it read *before* looking
//! (`SessionHandle::drained_at`); every message up to that position that was routed to the
//! session was routed before the position was published, so it was in the queue, and is now
//! finished. A sweep writes a newer `low` every two seconds. Subscriptions are written before
//! the SUBACK (a subscription the anchor does not have would lose its messages at adoption).
//!
//! One writer task puts and deletes anchors, in order, so a later value never loses to an
//! earlier one; a node deletes an anchor only while it names that node (a session that moved
//! on belongs to the next node's anchor).

use crate::broker::Broker;
use crate::storage::record::{SessionSnapshot, SubscriptionRecord};
use crate::storage::Commit;
use async_nats::jetstream::kv;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// What the sweep writes at most this often per session.
const SWEEP: Duration = Duration::from_secs(2);

/// A session's anchor as read back.
pub(crate) struct Anchor {
    pub(crate) node: String,
    pub(crate) low: u64,
    pub(crate) subscriptions: Vec<SubscriptionRecord>,
}

fn encode(node: &str, low: u64, subs: &[SubscriptionRecord]) -> Bytes {
    let snap = SessionSnapshot {
        position: low,
        subscriptions: subs.to_vec(),
        ..Default::default()
    };
    let mut v = Vec::with_capacity(node.len() + 64);
    v.extend_from_slice(node.as_bytes());
    v.push(b'\n');
    v.extend_from_slice(&snap.encode());
    Bytes::from(v)
}

pub(crate) fn decode(value: &[u8]) -> Option<Anchor> {
    let i = value.iter().position(|&b| b == b'\n')?;
    let node = std::str::from_utf8(&value[..i]).ok()?.to_string();
    let snap = SessionSnapshot::decode(&value[i + 1..]).ok()?;
    Some(Anchor {
        node,
        low: snap.position,
        subscriptions: snap.subscriptions,
    })
}

enum Write {
    Put {
        client_id: Arc<str>,
        subs: Option<Vec<SubscriptionRecord>>,
        low: Option<u64>,
        done: Option<oneshot::Sender<()>>,
    },
    Delete {
        client_id: Arc<str>,
    },
}

/// What this node last wrote of each of its sessions' anchors.
#[derive(Default)]
struct Known {
    subs: Vec<SubscriptionRecord>,
    low: u64,
}

pub(crate) struct Anchors {
    node: String,
    kv: kv::Store,
    known: Mutex<HashMap<Arc<str>, Known>>,
    tx: mpsc::UnboundedSender<Write>,
}

impl Anchors {
    /// The anchors of `node`, and the writer task to spawn.
    pub(crate) fn new(
        node: String,
        kv: kv::Store,
    ) -> (Arc<Anchors>, impl std::future::Future<Output = ()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let anchors = Arc::new(Anchors {
            node,
            kv,
            known: Mutex::new(HashMap::new()),
            tx,
        });
        let writer = anchors.clone().write(rx);
        (anchors, writer)
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Known>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads `client_id`'s anchor.
    pub(crate) async fn get(&self, client_id: &str) -> Option<Anchor> {
        let v = self.kv.get(super::claims::key(client_id)).await.ok()??;
        decode(&v)
    }

    /// Sets the session's subscriptions (and, if given, `low`); the returned commit is done
    /// once the anchor is stored with its replicas.
    pub(crate) fn put(
        &self,
        client_id: &Arc<str>,
        subs: Vec<SubscriptionRecord>,
        low: Option<u64>,
    ) -> Commit {
        let (done, rx) = oneshot::channel();
        let sent = self.tx.send(Write::Put {
            client_id: client_id.clone(),
            subs: Some(subs),
            low,
            done: Some(done),
        });
        match sent {
            Ok(()) => Commit::Pending(rx),
            Err(_) => Commit::Failed,
        }
    }

    /// The session ended here: its anchor goes, if it still names this node.
    pub(crate) fn delete(&self, client_id: &Arc<str>) {
        let _ = self.tx.send(Write::Delete {
            client_id: client_id.clone(),
        });
    }

    /// Writes a newer `low` for sessions that drained since the last sweep, for good.
    pub(crate) async fn sweep(self: Arc<Self>, broker: Arc<Broker>) {
        loop {
            tokio::time::sleep(SWEEP).await;
            for h in broker.registry.handles() {
                if !h.persistent.load(Ordering::Relaxed) {
                    continue;
                }
                let drained = h.drained_at.load(Ordering::Acquire);
                let stale = self
                    .known()
                    .get(&h.client_id)
                    .is_some_and(|k| k.low < drained);
                if stale {
                    let _ = self.tx.send(Write::Put {
                        client_id: h.client_id.clone(),
                        subs: None,
                        low: Some(drained),
                        done: None,
                    });
                }
            }
        }
    }

    async fn write(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Write>) {
        while let Some(w) = rx.recv().await {
            match w {
                Write::Put {
                    client_id,
                    subs,
                    low,
                    done,
                } => {
                    let value = {
                        let mut known = self.known();
                        if subs.is_none() && !known.contains_key(&client_id) {
                            // A `low` for a session whose subscriptions were never written
                            // here: an anchor without them would lose their messages.
                            continue;
                        }
                        let k = known.entry(client_id.clone()).or_default();
                        if let Some(s) = subs {
                            k.subs = s;
                        }
                        if let Some(l) = low {
                            k.low = k.low.max(l);
                        }
                        encode(&self.node, k.low, &k.subs)
                    };
                    match self.kv.put(super::claims::key(&client_id), value).await {
                        Ok(_) => {
                            if let Some(d) = done {
                                let _ = d.send(());
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%client_id, error = %e, "session anchor not stored")
                        }
                    }
                }
                Write::Delete { client_id } => {
                    self.known().remove(&client_id);
                    let key = super::claims::key(&client_id);
                    if let Ok(Some(entry)) = self.kv.entry(key.clone()).await {
                        let ours = decode(&entry.value).is_some_and(|a| a.node == self.node);
                        if ours {
                            let _ = self
                                .kv
                                .delete_expect_revision(&key, Some(entry.revision))
                                .await;
                        }
                    }
                }
            }
        }
    }

    /// Starts tracking a session that is on this node (restored, or moved in) with what its
    /// anchor says, so the sweep may write its `low`.
    pub(crate) fn track(&self, client_id: &Arc<str>, subs: Vec<SubscriptionRecord>, low: u64) {
        self.known().insert(client_id.clone(), Known { subs, low });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::SubscriptionOptions;

    #[test]
    fn an_anchor_round_trips() {
        let subs = vec![SubscriptionRecord {
            filter: "a/#".into(),
            options: SubscriptionOptions::default(),
            id: Some(3),
        }];
        let a = decode(&encode("t2", 99, &subs)).unwrap();
        assert_eq!((a.node.as_str(), a.low, a.subscriptions), ("t2", 99, subs));
        assert!(decode(b"no newline").is_none());
        assert!(decode(b"t1\n\x00").is_none());
    }
}
