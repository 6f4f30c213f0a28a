//! Shared subscription groups across nodes: the members of `$share/G/F` on every node form
//! one group, and each message of the group goes to one node, which hands it to one of its
//! members (the group's strategy and credit, `broker/shared/`, hold within that node).
//!
//! | messages | how one node is chosen |
//! |---|---|
//! | QoS 1/2 | one durable pull consumer per group on the messages stream, filtered by the group's filter; every node with members pulls from it as much as its group queue has room for, so faster nodes take more |
//! | QoS 0 | one NATS queue group per group on the QoS 0 subjects; NATS gives each message to one subscribed node |
//!
//! A pulled message is acknowledged to JetStream once it is committed to the node's group
//! queue; one that does not fit is NAKed to come back (possibly to another node) a second
//! later. While a node has no member of a group it neither pulls nor subscribes, and its
//! routing leaves groups out altogether (`Broker::route`), so a message never reaches a
//! group twice through two nodes.
//!
//! What this does not cover yet: a message committed to a node's group queue stays with that
//! node. If the node dies, it comes back with the node's data directory, not on another
//! node (docs/cluster.md, "Guarantees").

use super::{wire, Names};
use crate::broker::shared::Group;
use crate::broker::Broker;
use crate::storage::Commit;
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    AckKind,
};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::task::AbortHandle;

/// Messages a node's group queue may hold before the node stops pulling more for it.
const HIGH_WATER: usize = 256;

pub(crate) struct ClusterGroups {
    pub(crate) broker: Arc<Broker>,
    /// A NATS connection that receives its own node's publishes (the main one does not),
    /// since a node's queue group member must be able to win its own node's messages.
    pub(crate) echo: async_nats::Client,
    pub(crate) msgs: jetstream::stream::Stream,
    pub(crate) names: Arc<Names>,
    pub(crate) replicas: usize,
    /// How long JetStream keeps a group consumer nobody pulls from.
    pub(crate) idle: Duration,
    pub(crate) running: Mutex<HashMap<String, Vec<AbortHandle>>>,
}

/// A group's name in NATS: consumer and queue group names may not hold its filter's bytes.
fn group_name(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut s = String::from("grp_");
    for b in &digest[..12] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl ClusterGroups {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<AbortHandle>>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn start(self: &Arc<Self>, group: &Arc<Group>) {
        let key = group.key();
        let name = group_name(&key);
        let pull = tokio::spawn(self.clone().pull(group.clone(), name.clone()));
        let live = tokio::spawn(self.clone().live(group.clone(), name));
        let previous = self
            .running()
            .insert(key, vec![pull.abort_handle(), live.abort_handle()]);
        for h in previous.into_iter().flatten() {
            h.abort();
        }
    }

    pub(crate) fn end(&self, group: &Arc<Group>) {
        if let Some(handles) = self.running().remove(&group.key()) {
            for h in handles {
                h.abort();
            }
        }
    }

    /// Pulls the group's QoS 1/2 messages as long as the group has a member here.
    async fn pull(self: Arc<Self>, group: Arc<Group>, name: String) {
        let config = pull::Config {
            durable_name: Some(name.clone()),
            deliver_policy: DeliverPolicy::New,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 10_000,
            filter_subject: self.names.msgs.filter(&group.filter),
            num_replicas: self.replicas,
            inactive_threshold: self.idle,
            description: Some(format!("Tern shared group {}", group.key())),
            ..Default::default()
        };
        let consumer = loop {
            match self
                .msgs
                .get_or_create_consumer(&name, config.clone())
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(group = %group.key(), error = %e, "group consumer; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        loop {
            let queued = group.queue.outbox.len();
            if queued >= HIGH_WATER {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let batch = consumer
                .fetch()
                .max_messages((HIGH_WATER - queued).min(128))
                .expires(Duration::from_secs(1))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(group = %group.key(), error = %e, "group fetch");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(item) = batch.next().await {
                let Ok(m) = item else { continue };
                let Some(msg) = wire::decode(&m.payload, self.broker.next_message_id(), false)
                else {
                    let _ = m.ack_with(AckKind::Term).await;
                    continue;
                };
                self.broker.metrics.cluster.in_stream.inc();
                match self.broker.publish_to_group(&group, &msg) {
                    Some(Commit::Done) => {
                        let _ = m.ack().await;
                    }
                    Some(Commit::Pending(rx)) => {
                        tokio::spawn(async move {
                            let kind = match rx.await {
                                Ok(()) => AckKind::Ack,
                                Err(_) => AckKind::Nak(None),
                            };
                            let _ = m.ack_with(kind).await;
                        });
                    }
                    // Full here or not stored: back to the group, for this node or another.
                    None | Some(Commit::Failed) => {
                        let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                    }
                }
            }
        }
    }

    /// Takes this node's share of the group's QoS 0 messages.
    async fn live(self: Arc<Self>, group: Arc<Group>, name: String) {
        let subject = self.names.live.filter(&group.filter);
        let mut sub = loop {
            match self
                .echo
                .queue_subscribe(subject.clone(), name.clone())
                .await
            {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(group = %group.key(), error = %e, "group queue subscription; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        while let Some(m) = sub.next().await {
            if let Some(msg) = wire::decode(&m.payload, self.broker.next_message_id(), false) {
                self.broker.metrics.cluster.in_live.inc();
                let _ = self.broker.publish_to_group(&group, &msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn group_names_are_valid_nats_names() {
        let a = super::group_name("$share/g/a/+/#");
        assert!(a.starts_with("grp_") && a.len() == 28);
        assert!(a[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, super::group_name("$share/g/a/+"));
    }
}
