//! A connection's side of shared subscriptions: joining and leaving groups, taking the lanes
//! the groups' dispatchers fill, and telling a group when one of its deliveries is finished.

use super::client::Client;
use crate::broker::shared::{membership, Group, Membership};
use crate::outbox::Delivery;
use crate::protocol::{QoS, SubscriptionOptions};
use crate::storage::{Commit, Op};
use std::sync::Arc;

impl Client {
    /// Joins (or updates) the membership of `$share/{share}/{filter}`.
    pub(super) fn join_group(
        &mut self,
        share: &str,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) -> Commit {
        let group = self.broker.subscribe_shared(
            &self.handle,
            share,
            filter,
            options,
            id,
            true,
            self.window,
        );
        // In a cluster, the SUBACK waits until this node takes its share of the group.
        let ready = self
            .broker
            .peers()
            .map_or(Commit::Done, |p| p.group_ready(&group));
        if !self.groups.iter().any(|g| Arc::ptr_eq(g, &group)) {
            self.groups.push(group);
        }
        ready
    }

    /// Joins the declared queue `name` as a consumer; false when there is no such queue.
    pub(super) fn join_queue(
        &mut self,
        name: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) -> bool {
        let Some(group) =
            self.broker
                .subscribe_queue(&self.handle, name, options, id, true, self.window)
        else {
            return false;
        };
        if !self.groups.iter().any(|g| Arc::ptr_eq(g, &group)) {
            self.groups.push(group);
        }
        true
    }

    /// Leaves the group `$share/NAME/FILTER` (or the queue `$queue/NAME`). Deliveries of it still in flight stay with this
    /// connection and finish normally.
    pub(super) fn leave_group(&mut self, key: &str) {
        self.broker.unsubscribe_shared(&self.handle, key);
        self.groups.retain(|g| g.key() != key);
    }

    /// On connect with a present session: its memberships come online with this connection's
    /// window.
    pub(crate) fn attach_groups(&mut self) {
        let keys: Vec<String> = self
            .state
            .subscriptions
            .keys()
            .filter(|f| membership(f).is_some())
            .cloned()
            .collect();
        for key in keys {
            let group = self.broker.groups.get(&key);
            match group {
                Some(g) if g.is_member(self.handle.id) => {
                    g.set_online(self.handle.id, true, self.window);
                    self.groups.push(g);
                }
                _ => {
                    // Restored from an older state without its group: join again (a queue
                    // that ended is not made again).
                    let Some(sub) = self.state.subscriptions.get(&key).cloned() else {
                        continue;
                    };
                    match membership(&key) {
                        Some(Ok(Membership::Shared { share, filter })) => {
                            let (share, inner) = (share.to_string(), filter.to_string());
                            self.join_group(&share, &inner, sub.options, sub.id);
                        }
                        Some(Ok(Membership::Queue(name))) => {
                            let name = name.to_string();
                            self.join_queue(&name, sub.options, sub.id);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Takes what the groups' dispatchers assigned to this session, within `slots` (free
    /// in-flight window) and `max` deliveries in `out`. Returns the slots left.
    pub(super) fn take_lanes(
        &self,
        mut slots: usize,
        max: usize,
        out: &mut Vec<Delivery>,
    ) -> usize {
        for g in &self.groups {
            if out.len() >= max {
                break;
            }
            let before = out.len();
            g.take_lane(self.handle.id, slots, max, out);
            let used = out[before..]
                .iter()
                .filter(|d| d.qos != QoS::AtMostOnce)
                .count();
            slots -= used.min(slots);
        }
        slots
    }

    /// Whether deliveries wait for this session (its outbox, or a group's lane).
    pub(super) fn has_waiting(&self) -> bool {
        !self.handle.outbox.is_empty() || self.groups.iter().any(|g| g.lane_len(self.handle.id) > 0)
    }

    /// A delivery of a group is finished here: `entry` — its entry in the group's queue may go
    /// (when it stayed there: a member whose session is not stored); `credit` — it no longer
    /// takes a place in this member's window.
    pub(super) fn group_delivery_done(&mut self, d: &Delivery, entry: bool, credit: bool) {
        let Some(id) = d.group else {
            return;
        };
        if entry {
            self.group_finished(d);
        }
        if entry && !d.stored {
            if let Some(seq) = d.seq {
                self.pending_ops.push(Op::Dequeue {
                    session_id: id.0,
                    seq,
                });
            }
        }
        if credit {
            if let Some(group) = self.group_of(d) {
                group.release(self.handle.id);
            }
        }
    }

    /// This member is finished with a group's message: in a cluster, the group's consumer
    /// may now let go of it (`cluster/groups.rs`).
    pub(super) fn group_finished(&self, d: &Delivery) {
        if d.group.is_some() {
            if let Some(peers) = self.broker.peers() {
                peers.group_done(d.msg.id);
            }
        }
    }

    /// The group a delivery came through, among those this member belongs to (a handful: a
    /// scan beats a shared lock on every acknowledgement). None once the member left it: a
    /// group counts credit for members only, so there is nothing to give back then.
    pub(super) fn group_of(&self, d: &Delivery) -> Option<&Arc<Group>> {
        let id = d.group?;
        self.groups.iter().find(|g| g.id() == id)
    }

    /// The queue a delivery's `seq` belongs to.
    pub(super) fn queue_of(&self, d: &Delivery) -> u64 {
        d.group.map_or(self.handle.id, |g| g.0)
    }
}
