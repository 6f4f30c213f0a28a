//! Wills of clients whose node died: published by a surviving node.
//!
//! While a client with a Will Message is connected, its will is also in the wills bucket
//! (key: the client id's hash; value: node, connection, the will), stored before its CONNACK.
//! The connection's own node handles the will as on a single node and removes the copy when
//! the connection closes. A copy left behind therefore means its node died with the
//! connection open:
//!
//! - every node watches the heartbeats in the nodes bucket; when a node it saw alive is gone,
//!   the survivors race to create one `reap` key for it, and the winner publishes the wills
//!   that name the dead node (after each one's Will Delay Interval, unless the client has
//!   connected again meanwhile: then its new connection replaced the copy), removing each;
//! - a node that restarts publishes the copies that name itself (its previous run's clients
//!   lost their connections when it stopped) before it accepts clients.
//!
//! A will waiting for its Will Delay Interval keeps its copy, marked with the disconnect's
//! time, until its node publishes it (or the client connects again, anywhere, which cancels
//! it): a survivor publishes it when what remains of the delay is up.

use crate::broker::Broker;
use crate::protocol::Will;
use crate::storage::record::SessionRecord;
use crate::storage::Commit;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

pub(crate) struct Wills {
    pub(crate) broker: Arc<Broker>,
    pub(crate) kv: kv::Store,
    pub(crate) nodes: kv::Store,
    pub(crate) node: String,
    pub(crate) heartbeat_ttl: Duration,
    /// Removals under way (a shutdown waits for them, or the next start would publish
    /// wills of connections that closed normally).
    pub(crate) removing: Arc<AtomicUsize>,
    pub(crate) available: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) quorum_timeout: Duration,
    /// The nodes with a live heartbeat at the last look, sorted.
    pub(crate) members: std::sync::RwLock<Vec<String>>,
}

/// A copy's value. `disconnected_at_ms`: set once the connection closed and its will waits
/// for its delay (the copy then stands for that delayed will).
fn encode(
    node: &str,
    conn_id: u64,
    client_id: &str,
    will: &Will,
    disconnected_at_ms: Option<u64>,
) -> Bytes {
    let rec = SessionRecord {
        client_id: client_id.to_string(),
        session_id: 0,
        expiry_interval: 0,
        disconnected_at_ms,
        will: Some(will.into()),
        username: None,
    };
    let mut v = format!("{node}\n{conn_id}\n").into_bytes();
    v.extend_from_slice(&rec.encode());
    Bytes::from(v)
}

/// A stored copy.
struct Stored {
    node: String,
    conn: u64,
    client_id: String,
    will: Will,
    disconnected_at_ms: Option<u64>,
}

fn decode(v: &[u8]) -> Option<Stored> {
    let mut parts = v.splitn(3, |&b| b == b'\n');
    let node = std::str::from_utf8(parts.next()?).ok()?.to_string();
    let conn = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let rec = SessionRecord::decode(parts.next()?).ok()?;
    Some(Stored {
        node,
        conn,
        client_id: rec.client_id,
        will: rec.will?.to_will(),
        disconnected_at_ms: rec.disconnected_at_ms,
    })
}

/// Counts a removal done when dropped, however its task ends.
struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Wills {
    /// Stores the will of connection `conn_id`; the CONNACK waits for the returned commit, at
    /// most `quorum_timeout`, and not at all without quorum: a will is the broker's promise to
    /// the other clients, kept as far as the cluster can, and no reason to refuse a CONNECT.
    pub(crate) fn put(self: &Arc<Self>, client_id: &str, conn_id: u64, will: &Will) -> Commit {
        let (tx, rx) = oneshot::channel();
        let mut tx = if self.available.load(Ordering::Relaxed) {
            Some(tx)
        } else {
            let _ = tx.send(());
            None
        };
        let key = super::claims::key(client_id);
        let value = encode(&self.node, conn_id, client_id, will, None);
        let this = self.clone();
        tokio::spawn(async move {
            let put = this.kv.put(key, value);
            tokio::pin!(put);
            let result = tokio::select! {
                r = &mut put => r,
                () = tokio::time::sleep(this.quorum_timeout) => {
                    if let Some(t) = tx.take() {
                        let _ = t.send(());
                    }
                    put.await
                }
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "will not stored in the cluster");
            }
            if let Some(t) = tx.take() {
                let _ = t.send(());
            }
        });
        Commit::Pending(rx)
    }

    /// Connection `conn_id` closed and its node dealt with its will: the copy goes.
    pub(crate) fn remove(self: &Arc<Self>, client_id: &str, conn_id: u64) {
        self.with_copy(client_id, move |this, key, e| async move {
            if decode(&e.value).is_some_and(|c| c.node == this.node && c.conn == conn_id) {
                let _ = this.kv.delete_expect_revision(&key, Some(e.revision)).await;
            }
        });
    }

    /// Runs `f` on `client_id`'s copy in the background, counted for a shutdown's drain.
    fn with_copy<F, Fut>(self: &Arc<Self>, client_id: &str, f: F)
    where
        F: FnOnce(Arc<Self>, String, kv::Entry) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let key = super::claims::key(client_id);
        let this = self.clone();
        self.removing.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            let _done = Decrement(this.removing.clone());
            if let Ok(Some(e)) = this.kv.entry(key.clone()).await {
                if e.operation == kv::Operation::Put {
                    f(this.clone(), key, e).await;
                }
            }
        });
    }

    /// Connection `conn_id` closed and its will waits for its delay here: the copy stays,
    /// marked with the time, so a survivor publishes it when the delay is up should this node
    /// die meanwhile.
    pub(crate) fn closed_with_delay(self: &Arc<Self>, client_id: &str, conn_id: u64) {
        let now = crate::storage::record::unix_now_ms();
        self.with_copy(client_id, move |this, key, e| async move {
            if let Some(c) = decode(&e.value).filter(|c| c.node == this.node && c.conn == conn_id) {
                let value = encode(&c.node, c.conn, &c.client_id, &c.will, Some(now));
                let _ = this.kv.update(&key, value, e.revision).await;
            }
        });
    }

    /// This node published its delayed will: the copy goes.
    pub(crate) fn settled(self: &Arc<Self>, client_id: &str) {
        self.with_copy(client_id, |this, key, e| async move {
            if decode(&e.value).is_some_and(|c| c.node == this.node) {
                let _ = this.kv.delete_expect_revision(&key, Some(e.revision)).await;
            }
        });
    }

    /// The client connected again without a will: a will with a delay it left is cancelled
    /// ([MQTT-3.1.3-9]), wherever it waits, also that of a connection that was open when its
    /// node died (its delay counts from the death). A will without delay stays: it was due
    /// when its connection ended.
    pub(crate) fn cancelled(self: &Arc<Self>, client_id: &str) {
        self.with_copy(client_id, |this, key, e| async move {
            if decode(&e.value).is_some_and(|c| c.will.delay_interval > 0) {
                let _ = this.kv.delete_expect_revision(&key, Some(e.revision)).await;
            }
        });
    }

    /// Publishes the wills left by `dead`'s connections: at once, or when what remains of
    /// each one's delay is up (counted from its disconnect, or from now for a connection that
    /// was open when its node died). At this node's own start (`dead` is this node), the
    /// clients whose session this node restored are left to that session's own will.
    pub(crate) async fn reap(self: &Arc<Self>, dead: &str) {
        let Ok(mut keys) = self.kv.keys().await else {
            return;
        };
        let own = dead == self.node;
        let mut n = 0;
        while let Some(Ok(key)) = keys.next().await {
            let Ok(Some(e)) = self.kv.entry(key.clone()).await else {
                continue;
            };
            if e.operation != kv::Operation::Put {
                continue;
            }
            let Some(c) = decode(&e.value) else {
                continue;
            };
            if c.node != dead || (own && self.broker.registry.state_of(&c.client_id).is_some()) {
                continue;
            }
            n += 1;
            let delay = u64::from(c.will.delay_interval);
            let left = match c.disconnected_at_ms {
                Some(at) => {
                    let away = crate::storage::record::unix_now_ms().saturating_sub(at) / 1000;
                    delay.saturating_sub(away)
                }
                None => delay,
            };
            let this = self.clone();
            let revision = e.revision;
            tokio::spawn(async move {
                if left > 0 {
                    tokio::time::sleep(Duration::from_secs(left)).await;
                }
                // Still the dead connection's copy: its client did not come back meanwhile.
                let still = matches!(this.kv.entry(key.clone()).await, Ok(Some(e)) if e.revision == revision && e.operation == kv::Operation::Put);
                if still
                    && this
                        .kv
                        .delete_expect_revision(&key, Some(revision))
                        .await
                        .is_ok()
                {
                    tracing::info!(client_id = %c.client_id, node = %c.node, "will of a client of a node that is gone published");
                    this.broker.publish_will(&c.will, 0);
                }
            });
        }
        if n > 0 {
            tracing::warn!(node = %dead, wills = n, "publishing the wills of a node that is gone");
        }
    }

    /// Watches the heartbeats for good; the first survivor to claim a vanished node's reap
    /// key publishes its wills.
    pub(crate) async fn watch_nodes(self: Arc<Self>) {
        let mut alive: HashSet<String> = HashSet::new();
        loop {
            tokio::time::sleep(self.heartbeat_ttl / 2).await;
            let Ok(keys) = self.nodes.keys().await else {
                continue;
            };
            let now: HashSet<String> = keys
                .filter_map(|k| async move { k.ok() })
                .filter(|k| std::future::ready(!k.starts_with("reap.")))
                .collect()
                .await;
            let mut sorted: Vec<String> = now.iter().cloned().collect();
            sorted.sort();
            self.broker.metrics.cluster.members.set(sorted.len() as i64);
            *self
                .members
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = sorted;
            for gone in alive.difference(&now) {
                if *gone == self.node {
                    continue;
                }
                let claim = self
                    .nodes
                    .create(format!("reap.{gone}"), Bytes::from(self.node.clone()))
                    .await;
                if claim.is_ok() {
                    self.reap(gone).await;
                }
            }
            alive = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MqttStr, PublishProperties, QoS};

    #[test]
    fn a_will_copy_round_trips() {
        let will = Will {
            topic: MqttStr::from("dev/1/status"),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            delay_interval: 5,
            properties: PublishProperties::default(),
        };
        let c = decode(&encode("t3", 42, "dev-1", &will, Some(7))).unwrap();
        assert_eq!(
            (c.node.as_str(), c.conn, c.client_id.as_str()),
            ("t3", 42, "dev-1")
        );
        assert_eq!(c.disconnected_at_ms, Some(7));
        assert_eq!(
            crate::storage::record::WillRecord::from(&c.will),
            crate::storage::record::WillRecord::from(&will)
        );
        assert_eq!(
            decode(&encode("t3", 42, "dev-1", &will, None))
                .unwrap()
                .disconnected_at_ms,
            None
        );
        assert!(decode(b"t3\nx\n").is_none());
    }
}
