//! Bridge leases: a bridge (`[[bridges]]`, docs/bridges.md) runs on one node of a cluster at a
//! time. The node that runs it holds its key in the key-value bucket `P_bridges`, whose
//! entries expire `LEASE_TTL` after their last write: the holder writes it again every third
//! of that, each write conditional on the revision it wrote last, so two nodes can never both
//! think they hold it. When the holder dies (or loses NATS), its key expires and another node
//! that has the bridge configured takes it with a create, which only succeeds on a missing
//! key. A holder that stops the bridge (shutdown, reload) deletes the key, so the next node
//! need not wait for the expiry.

use async_nats::jetstream::kv;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// How long a lease outlives its holder's last renewal: the longest a bridge is not running
/// anywhere after its node died.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(10);

pub(crate) struct Leases {
    pub(crate) kv: kv::Store,
    pub(crate) node: String,
    /// The revision of this node's last write of each lease it holds.
    pub(crate) held: Mutex<HashMap<String, u64>>,
}

impl Leases {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes or renews the lease of bridge `name`; whether this node holds it now.
    pub(crate) async fn hold(&self, name: &str) -> bool {
        let value = bytes::Bytes::from(self.node.clone());
        let previous = self.held().get(name).copied();
        let wrote = match previous {
            Some(revision) => self.kv.update(name, value, revision).await.ok(),
            None => self.kv.create(name, value).await.ok(),
        };
        let mut held = self.held();
        match wrote {
            Some(revision) => {
                held.insert(name.to_string(), revision);
                true
            }
            None => {
                if held.remove(name).is_some() {
                    tracing::warn!(bridge = %name, node = %self.node, "bridge lease lost");
                }
                false
            }
        }
    }

    /// Lets go of the lease of bridge `name`, if held, so another node takes it at once.
    pub(crate) async fn release(&self, name: &str) {
        let revision = self.held().remove(name);
        if revision.is_some() {
            let _ = self.kv.delete(name).await;
        }
    }
}
