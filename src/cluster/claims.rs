//! Client ids unique across the cluster ([MQTT-3.1.4-3]: a new connection with a client id
//! takes the session over from the connection that has it, on whichever node that is).
//!
//! Each CONNECT puts `node/connection` under the client id's key in the clients bucket. The
//! bucket is one JetStream stream, so its revisions totally order concurrent CONNECTs on
//! different nodes, and every node sees the puts in that order. A node holding a client id
//! takes its own connection over when it sees another node's put with a *higher* revision
//! than its own claim's; an older put seen late (the watch lags the put's reply) changes
//! nothing. So of two racing CONNECTs exactly the later one in the stream survives, on
//! every node's reading.
//!
//! A node that loses a client id also ends its session of it, at once when its client is
//! away, or when the connection it takes over lets go: a client id has one session in the
//! cluster, never a stale second one to come back to.
//!
//! Keys are the SHA-256 of the client id in hex: a client id may hold any UTF-8 and be up to
//! 65,535 bytes, a key may not.

use crate::broker::Broker;
use crate::session::registry::Moved;
use crate::storage::Commit;
use async_nats::jetstream::kv;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub(crate) struct Claims {
    broker: Arc<Broker>,
    /// The node's quorum health (`Node::available`): a claim is not waited for without it.
    available: Arc<std::sync::atomic::AtomicBool>,
    quorum_timeout: Duration,
    node: String,
    kv: kv::Store,
    /// Client ids whose connection is on this node, by key.
    held: Mutex<HashMap<String, Claim>>,
}

struct Claim {
    client_id: Arc<str>,
    conn_id: u64,
    /// The revision of our put, once JetStream answered.
    revision: Option<u64>,
    /// The highest revision of another node's put of this key seen meanwhile.
    newest_other: u64,
}

/// The bucket key of a client id.
pub(crate) fn key(client_id: &str) -> String {
    let digest = Sha256::digest(client_id.as_bytes());
    let mut s = String::with_capacity(64);
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl Claims {
    pub(crate) fn new(
        broker: Arc<Broker>,
        node: String,
        kv: kv::Store,
        available: Arc<std::sync::atomic::AtomicBool>,
        quorum_timeout: Duration,
    ) -> Claims {
        Claims {
            broker,
            available,
            quorum_timeout,
            node,
            kv,
            held: Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Claim>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `conn_id` holds `client_id` here, and tells the cluster; the commit is
    /// done once the claim is stored.
    pub(crate) fn claim(self: &Arc<Self>, client_id: &Arc<str>, conn_id: u64) -> Commit {
        let key = key(client_id);
        self.held().insert(
            key.clone(),
            Claim {
                client_id: client_id.clone(),
                conn_id,
                revision: None,
                newest_other: 0,
            },
        );
        let this = self.clone();
        let client_id = client_id.clone();
        let (stored, rx) = tokio::sync::oneshot::channel();
        // Without quorum the claim cannot be stored: a clean session still connects (it
        // promises nothing durable), without waiting, its client id unique only as far as
        // this node knows.
        let mut stored = if self.available.load(std::sync::atomic::Ordering::Relaxed) {
            Some(stored)
        } else {
            let _ = stored.send(());
            None
        };
        let wait = self.quorum_timeout;
        tokio::spawn(async move {
            let value = format!("{}/{conn_id}/{client_id}", this.node);
            let put = this.kv.put(&key, value.into());
            tokio::pin!(put);
            let result = tokio::select! {
                r = &mut put => r,
                () = tokio::time::sleep(wait) => {
                    if let Some(s) = stored.take() {
                        let _ = s.send(());
                    }
                    put.await
                }
            };
            match result {
                Ok(revision) => {
                    if let Some(s) = stored.take() {
                        let _ = s.send(());
                    }
                    let mut held = this.held();
                    let lost = match held.get_mut(&key) {
                        Some(c) if c.conn_id == conn_id => {
                            c.revision = Some(revision);
                            c.newest_other > revision
                        }
                        _ => false,
                    };
                    if lost {
                        if let Some(c) = held.remove(&key) {
                            drop(held);
                            this.taken_over(&c);
                        }
                    }
                }
                Err(e) => {
                    if let Some(s) = stored.take() {
                        let _ = s.send(());
                    }
                    tracing::warn!(
                        error = %e,
                        "client id claim not stored: a connection with the same id on another node may not be taken over"
                    )
                }
            }
        });
        Commit::Pending(rx)
    }

    /// `conn_id` let go of `client_id`.
    pub(crate) fn release(&self, client_id: &str, conn_id: u64) {
        let key = key(client_id);
        let mut held = self.held();
        if held.get(&key).is_some_and(|c| c.conn_id == conn_id) {
            held.remove(&key);
        }
    }

    fn taken_over(&self, c: &Claim) {
        self.moved(&c.client_id, Some(c.conn_id));
    }

    /// `client_id` is another node's now: the connection (`conn_id`) or the away session
    /// here gives way (`Registry::moved`).
    fn moved(&self, client_id: &str, conn_id: Option<u64>) {
        match self.broker.registry.moved(client_id, conn_id) {
            Moved::Nothing => {}
            Moved::Kicked => {
                self.broker.metrics.cluster.taken_over.inc();
                tracing::info!(%client_id, "session taken over by another node");
            }
            Moved::Ended(ended) => {
                // Nobody is attached (checked under the registry lock): the state is free.
                if let Ok(mut state) = ended.state.try_lock() {
                    self.broker.end_session(&ended.handle, &mut state);
                }
                tracing::info!(%client_id, "session ended: its client connected on another node");
            }
        }
    }

    /// Follows every node's claims for good.
    pub(crate) async fn watch(self: Arc<Self>) {
        let mine = format!("{}/", self.node);
        loop {
            let mut watch = match self.kv.watch_all().await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch client id claims; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(entry) = watch.next().await {
                let Ok(entry) = entry else { continue };
                if entry.operation != kv::Operation::Put || entry.value.starts_with(mine.as_bytes())
                {
                    continue;
                }
                let mut held = self.held();
                let lost = match held.get_mut(&entry.key) {
                    Some(c) => {
                        c.newest_other = c.newest_other.max(entry.revision);
                        c.revision.is_some_and(|r| r < entry.revision)
                    }
                    None => {
                        drop(held);
                        // No connection here holds it; a session of its client may be
                        // waiting here, and must not outlive the move.
                        let text = String::from_utf8_lossy(&entry.value);
                        if let Some(client_id) = text.splitn(3, '/').nth(2) {
                            self.moved(client_id, None);
                        }
                        continue;
                    }
                };
                if lost {
                    if let Some(c) = held.remove(&entry.key) {
                        drop(held);
                        self.taken_over(&c);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_fixed_length_hex_whatever_the_client_id() {
        let long = "x".repeat(65_535);
        for id in ["a", "", "ünï/cøde.*>", long.as_str()] {
            let k = super::key(id);
            assert_eq!(k.len(), 64);
            assert!(k.bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(super::key("a"), super::key("b"));
    }
}
