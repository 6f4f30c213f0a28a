//! The lifecycle of shared subscription groups on the broker: a session joins or leaves a
//! group, a group is made (or restored) and indexed once in the subscription index, a group
//! nobody belongs to any more ends, and a member that goes away gives back what it held.

use super::{give_back_stored, membership, record_key, Group, Kind};
use crate::broker::{Broker, Staged, Subscriber};
use crate::outbox::Outbox;
use crate::protocol::{QoS, SubscriptionOptions};
use crate::session::registry::SessionHandle;
use crate::session::{Outbound, SessionState};
use crate::storage::record::SessionRecord;
use crate::storage::Op;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

impl Broker {
    /// Joins (or updates) `session`'s membership of shared subscription `share`/`filter`.
    /// `window` is the member connection's in-flight window (`online` false: restored while
    /// its client is away).
    #[allow(clippy::too_many_arguments)]
    pub fn subscribe_shared(
        self: &Arc<Self>,
        session: &Arc<SessionHandle>,
        share: &str,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
        online: bool,
        window: usize,
    ) -> Arc<Group> {
        let key = format!("$share/{share}/{filter}");
        let (group, created) = self.groups.join(
            &key,
            || self.make_group(Kind::Shared, share, filter, None),
            |g| g.join(session, options, id, online, window),
        );
        if session.persistent.load(Ordering::Relaxed) {
            self.store_group(&group);
        }
        self.index_group(&group);
        if created {
            tokio::spawn(group.clone().run(Arc::downgrade(self)));
            if let Some(peers) = self.peers() {
                peers.group_started(&group);
            }
        }
        group
    }

    /// Makes `group`'s queue durable (with durable storage): its session record is stored
    /// before anything is queued for it (the store keeps submission order), so recovery
    /// finds the group even before its first message. Once per group.
    pub(super) fn store_group(&self, group: &Group) {
        if self.store.durable() && !group.queue.persistent.swap(true, Ordering::Relaxed) {
            let _ = self.store.submit(vec![Op::PutSession(SessionRecord {
                client_id: group.queue.client_id.to_string(),
                session_id: group.queue.id,
                expiry_interval: u32::MAX,
                disconnected_at_ms: None,
                will: None,
                username: None,
            })]);
        }
    }

    /// Makes a group (`restored`: its storage id and queue recovered from the store). A
    /// declared queue (`share` its name) gets its limits and policy from
    /// [`Broker::declare_queues`].
    pub(crate) fn make_group(
        &self,
        kind: Kind,
        share: &str,
        filter: &str,
        restored: Option<u64>,
    ) -> Arc<Group> {
        let shared = &self.config.shared;
        let (key, metrics, strategy) = match kind {
            Kind::Shared => (
                format!("$share/{share}/{filter}"),
                self.metrics.group_metrics(share, filter),
                shared.strategy_of(share),
            ),
            Kind::Queue => (
                super::queue_key(share),
                self.metrics.queue_metrics(share),
                crate::config::Strategy::default(),
            ),
            Kind::Bridge => (
                super::bridge_key(share),
                self.metrics.bridge_queue_metrics(share),
                crate::config::Strategy::default(),
            ),
        };
        let id = restored.unwrap_or_else(|| self.registry.allocate_id());
        let queue = Arc::new(SessionHandle::new(
            id,
            Arc::from(record_key(&key)),
            Outbox::new(shared.max_queued_messages, shared.max_queued_bytes),
            restored.is_some(),
        ));
        Arc::new(Group::new(kind, share, filter, strategy, queue, metrics))
    }

    /// (Re)writes a group's entries in the subscription index: one entry per group and
    /// filter, at the highest QoS any member asked for (a declared queue or bridge: while
    /// declared, at QoS 2; a bridge's with No Local, so what came in over it, published with
    /// its queue as origin, never goes back out).
    pub(super) fn index_group(&self, group: &Arc<Group>) {
        if group.kind != Kind::Shared && !group.declared() {
            return;
        }
        let options = SubscriptionOptions {
            qos: group.index_qos(),
            no_local: group.kind == Kind::Bridge,
            ..SubscriptionOptions::default()
        };
        let mut index = self
            .subscriptions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for filter in group.filters() {
            index.subscribe(
                &filter,
                group.queue.id,
                Subscriber {
                    session: group.queue.clone(),
                    options,
                    id: None,
                    group: Some(group.clone()),
                },
            );
        }
    }

    /// Takes `filters` of `group` out of the index (a declared group that stopped collecting,
    /// or whose filters changed).
    pub(super) fn unindex_group(&self, group: &Group, filters: &[Arc<str>]) {
        let mut index = self
            .subscriptions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for f in filters {
            index.unsubscribe(f, group.queue.id);
        }
    }

    /// `session` leaves the group `key` (`$share/NAME/FILTER`); true if it was a member.
    pub fn unsubscribe_shared(&self, session: &SessionHandle, key: &str) -> bool {
        let Some(group) = self.groups.get(key) else {
            return false;
        };
        let was = group.is_member(session.id);
        if group.leave(session.id) {
            self.drop_group(&group);
        } else {
            self.index_group(&group);
        }
        was
    }

    /// Removes a group nobody belongs to any more; what it still queued is discarded. A
    /// declared queue is removed only once it is no longer declared and empty.
    pub(crate) fn drop_group(&self, group: &Arc<Group>) {
        if !self.groups.remove_if_empty(group) {
            return;
        }
        self.unindex_group(group, &group.filters());
        let discarded = group.queue.outbox.clear();
        if discarded > 0 {
            self.metrics.dropped_no_subscribers.inc_by(discarded as u64);
        }
        if self.store.durable() && group.queue.persistent.load(Ordering::Relaxed) {
            let _ = self.store.submit(vec![Op::DeleteSession {
                client_id: group.queue.client_id.to_string(),
                session_id: group.queue.id,
            }]);
        }
        if let Some(peers) = self.peers() {
            peers.group_ended(group);
        }
        match group.kind {
            Kind::Shared => self.metrics.forget_group(&group.share, &group.filter()),
            Kind::Queue => self.metrics.forget_queue(&group.share),
            Kind::Bridge => self.metrics.forget_bridge_queue(&group.share),
        }
        tracing::debug!(group = %group.key(), "shared subscription group ended");
    }

    /// A member's connection left (`ended`: its session ended too). Its lanes go back to its
    /// groups and so do the deliveries it had not finished (see [`super`] for which).
    pub fn shared_member_gone(
        self: &Arc<Self>,
        handle: &SessionHandle,
        state: &mut SessionState,
        ended: bool,
    ) {
        let mut emptied = Vec::new();
        for filter in state.subscriptions.keys() {
            if membership(filter).is_none() {
                continue;
            }
            let Some(group) = self.groups.get(filter) else {
                continue;
            };
            if !ended {
                group.set_online(handle.id, false, 0);
            } else if group.leave(handle.id) {
                emptied.push(group);
            } else {
                self.index_group(&group);
            }
        }
        let taken = state.inflight.take_where(|o| match o {
            Outbound::Published(d) => d.group.is_some() && (ended || d.qos == QoS::AtLeastOnce),
            Outbound::Released(d) => ended && d.group.is_some(),
        });
        let mut staged = Staged::default();
        for (packet_id, o) in taken {
            let (Outbound::Published(d) | Outbound::Released(d)) = &o;
            // A group that ended meanwhile discarded its queue: nothing to give back to.
            let Some(group) = d.group.and_then(|id| self.groups.by_id(id)) else {
                continue;
            };
            group.release(handle.id);
            if matches!(o, Outbound::Released(_)) || group.is_closed() {
                continue;
            }
            if d.stored && self.store.durable() {
                give_back_stored(&group, handle.id, packet_id, d, &mut staged);
            } else {
                group.take_back(vec![d.clone()]);
            }
        }
        self.commit_detached(staged);
        for group in emptied {
            self.drop_group(&group);
        }
    }
}
