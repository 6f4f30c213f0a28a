//! Declared queues (`[[queues]]`, docs/queues.md) on the broker: declared from the
//! configuration at start and on every reload, joined by subscribers of `$queue/NAME`, and
//! ended only when no longer declared, empty and without consumers.
//!
//! A declared queue is a [`Group`] of [`Kind::Queue`], so it is not a second implementation of
//! a queue: the group's own durable queue, dispatcher, credit, lanes, strategies and
//! redelivery serve it as they serve `$share` groups. What differs is who makes it (the
//! configuration, so it collects before any consumer exists), what it takes (QoS 1/2 messages
//! only, at their own QoS: its index entry asks for QoS 2 and QoS 0 routing skips it,
//! `Broker::route`), and its policy (limits, overflow, time to live).
//!
//! Reload: a new queue starts collecting; a queue no longer declared leaves the subscription
//! index (stops collecting) and keeps its messages for its consumers until it is empty; a
//! changed filter applies to messages routed from then on; changed limits apply to new
//! messages (a queue above a lowered limit refuses new ones, or with `drop_oldest` trims
//! its oldest, until it is within it).

use super::{queue_key, Group, Kind};
use crate::broker::Broker;
use crate::config::{Overflow, QueueConfig};
use crate::outbox::Oldest;
use crate::protocol::SubscriptionOptions;
use crate::session::registry::SessionHandle;
use std::sync::Arc;

/// One declared queue at a glance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueState {
    pub name: String,
    pub filter: String,
    /// Still in the configuration (collecting); false: draining until empty.
    pub declared: bool,
    /// Waiting (memory and disk), not yet given to a consumer.
    pub messages: usize,
    /// Sessions subscribed to `$queue/NAME`, connected or not.
    pub consumers: usize,
    /// Seconds the oldest waiting message has waited (0 when empty).
    pub oldest_age: u64,
}

impl Broker {
    /// Makes the configuration's queues exist with its settings (at start, after recovery,
    /// and on reload); queues it no longer lists stop collecting and end once empty.
    pub fn declare_queues(self: &Arc<Self>, declared: &[QueueConfig]) {
        for q in declared {
            let group = self.declare_group(Kind::Queue, &q.name, &[&q.filter]);
            group.queue.outbox.set_limits(q.max_messages, q.max_bytes);
            group.set_policy(q.overflow == Overflow::DropOldest, q.message_ttl);
            group.set_strategy(q.strategy);
            group.poke();
        }
        let names: Vec<&str> = declared.iter().map(|q| q.name.as_str()).collect();
        self.undeclare_others(Kind::Queue, &names);
    }

    /// Makes the declared group `name` of `kind` exist (restored, kept, or new), collecting
    /// `filters` from now on, stored, indexed and with its dispatcher running.
    pub(crate) fn declare_group(
        self: &Arc<Self>,
        kind: Kind,
        name: &str,
        filters: &[&str],
    ) -> Arc<Group> {
        let key = match kind {
            Kind::Bridge => super::bridge_key(name),
            _ => queue_key(name),
        };
        let first = filters.first().copied().unwrap_or("");
        let (group, created) =
            self.groups
                .join(&key, || self.make_group(kind, name, first, None), |_| {});
        let now: Vec<Arc<str>> = filters.iter().map(|f| Arc::from(*f)).collect();
        let changed = group.filters() != now;
        if changed || created {
            // Restored (filters are not stored) or changed by a reload: the index entries move
            // to the new filters, for messages routed from now on.
            let old = group.set_filters(filters);
            self.unindex_group(&group, &old);
        }
        group.set_declared(true);
        if let Some(peers) = self.peers() {
            // One queue across the nodes: a durable JetStream consumer keeps it, each node
            // pulls from it while it has connected consumers (`cluster/groups.rs`); what a
            // node holds is a memory buffer of unacknowledged JetStream messages.
            if created {
                tokio::spawn(group.clone().run(Arc::downgrade(self)));
                tracing::info!(group = %group.key(), filters = ?filters, "declared across the cluster");
            }
            if (created || changed) && !filters.is_empty() {
                // (Again, for a changed filter: the consumer is updated to it.) A bridge with
                // `in` rules only has nothing to collect.
                peers.group_started(&group);
            }
            return group;
        }
        self.store_group(&group);
        self.index_group(&group);
        if created {
            tokio::spawn(group.clone().run(Arc::downgrade(self)));
            tracing::info!(group = %group.key(), filters = ?filters, "declared");
        }
        group
    }

    /// Declared groups of `kind` not in `names` stop collecting; each ends once it is empty
    /// and has no member.
    pub(crate) fn undeclare_others(&self, kind: Kind, names: &[&str]) {
        for group in self.groups.all() {
            if group.kind != kind || names.iter().any(|n| **n == *group.share) {
                continue;
            }
            if group.declared() {
                group.set_declared(false);
                self.unindex_group(&group, &group.filters());
                tracing::info!(
                    group = %group.key(),
                    left = group.queue.outbox.len(),
                    "no longer declared: it stops collecting and ends once drained"
                );
            }
            self.drop_group(&group);
        }
    }

    /// Joins `session` to the queue `name` as a consumer; None when there is no such queue
    /// (never declared, or ended). `window` is the consumer connection's in-flight window
    /// (`online` false: restored while its client is away).
    #[allow(clippy::too_many_arguments)]
    pub fn subscribe_queue(
        self: &Arc<Self>,
        session: &Arc<SessionHandle>,
        name: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
        online: bool,
        window: usize,
    ) -> Option<Arc<Group>> {
        let group = self
            .groups
            .get(&queue_key(name))
            .filter(|g| g.kind == Kind::Queue)?;
        let options = SubscriptionOptions {
            // Meaningless for a queue (its messages are nobody's own); never an error.
            no_local: false,
            ..options
        };
        group.join(session, options, id, online, window);
        Some(group)
    }

    /// The declared queues' heads are looked at again (their time to live), also while no
    /// consumer wakes their dispatchers. From the once-a-second sweep.
    pub(crate) fn poke_queues(&self) {
        for g in self.groups.all() {
            if g.kind == Kind::Queue {
                g.poke();
            }
        }
    }

    /// Every declared queue as operators see it (status page, `$SYS`), by name.
    pub fn queue_states(&self) -> Vec<QueueState> {
        let mut out: Vec<QueueState> = self
            .groups
            .all()
            .iter()
            .filter(|g| g.kind == Kind::Queue)
            .map(|g| QueueState {
                name: g.share.to_string(),
                filter: g.filter().to_string(),
                declared: g.declared(),
                messages: g.queue.outbox.len(),
                consumers: g.member_count(),
                oldest_age: self.oldest_age(g),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Age in seconds of the oldest message waiting in a group's queue (0 when empty).
    pub fn oldest_age(&self, group: &Group) -> u64 {
        self.queue_oldest_age(&group.queue, crate::storage::record::unix_now_ms() / 1000)
    }

    /// Age in seconds at Unix second `now` of the oldest message waiting in a queue (a
    /// session's or a group's; 0 when empty or unknown): the head in memory, else the disk's
    /// head, read from the store once and then remembered by the queue while it stays the
    /// head (so a look at a million offline sessions reads each head once, not each time).
    pub fn queue_oldest_age(&self, queue: &SessionHandle, now: u64) -> u64 {
        let enqueued = match queue.outbox.oldest() {
            Oldest::Nothing => 0,
            Oldest::Enqueued(t) => t,
            Oldest::OnDisk(from) => match self.store.read_queue(queue.id, from, 1) {
                Ok(entries) => {
                    let t = entries.first().map_or(0, |(_, e)| e.enqueued);
                    queue.outbox.spill_head_read(from, t);
                    t
                }
                Err(_) => 0,
            },
        };
        if enqueued == 0 {
            0
        } else {
            now.saturating_sub(u64::from(enqueued))
        }
    }
}
