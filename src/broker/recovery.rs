//! Startup: what the durable store recovered goes back into the broker before any listener
//! opens — sessions (detached, with their remaining expiry counted in wall-clock time, so
//! broker downtime counts), subscriptions into the index, in-flight and QoS 2 state, queue
//! positions, retained messages, and wills still waiting to be published.

use super::shared::{Kind, Membership};
use super::{shared, Broker, Staged};
use crate::message::Message;
use crate::outbox::{Delivery, SpillState, SubIds};
use crate::protocol::QoS;
use crate::session::{Outbound, SessionState, Subscription};
use crate::storage::record::unix_now_ms;
use crate::storage::{Op, Recovered};
use std::sync::Arc;
use std::time::Duration;

/// What was restored, for the startup log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub sessions: usize,
    pub expired_sessions: usize,
    pub subscriptions: usize,
    pub queued: u64,
    pub inflight: usize,
    pub retained: usize,
}

pub fn restore(broker: &Arc<Broker>, mut rec: Recovered) -> Restored {
    let mut out = Restored::default();
    broker.set_next_message_id(rec.next_message_id);
    broker.registry.set_next_id(rec.next_session_id);
    let now = crate::clock::now();
    let unix = unix_now_ms();
    let mut cleanup = Vec::new();

    for m in rec.retained.drain(..) {
        let msg = m.to_message(now, unix);
        if msg.is_expired(now) {
            cleanup.push(Op::DeleteRetained {
                topic: msg.topic.to_string(),
            });
            continue;
        }
        broker.restore_retained(Arc::new(msg));
        out.retained += 1;
    }

    // Shared subscription groups' queues first, so their members find them.
    let (groups, sessions): (Vec<_>, Vec<_>) = rec
        .sessions
        .drain(..)
        .partition(|s| s.client_id.starts_with(shared::RECORD_PREFIX));
    let mut restored_groups = Vec::new();
    for g in groups {
        let key = &g.client_id[shared::RECORD_PREFIX.len()..];
        let (kind, share, filter) = match shared::membership(key) {
            Some(Ok(Membership::Shared { share, filter })) => (Kind::Shared, share, filter),
            // Its filter is the configuration's: `Broker::declare_queues` sets it, and a queue
            // no longer declared does not collect.
            Some(Ok(Membership::Queue(name))) => (Kind::Queue, name, ""),
            // A bridge's outgoing queue: its filters are its `out` rules, set when the bridge
            // is declared (`Broker::declare_bridge`).
            None if key.starts_with(shared::BRIDGE_PREFIX) => {
                (Kind::Bridge, &key[shared::BRIDGE_PREFIX.len()..], "")
            }
            _ => {
                cleanup.push(Op::DeleteSession {
                    client_id: g.client_id.clone(),
                    session_id: g.session_id,
                });
                continue;
            }
        };
        broker.registry.set_next_id(g.session_id + 1);
        let group = broker.make_group(kind, share, filter, Some(g.session_id));
        if let Some(q) = rec.queues.remove(&g.session_id) {
            out.queued += q.len;
            group.queue.outbox.restore(SpillState {
                head: q.head,
                next_seq: q.tail,
                len: q.len as usize,
                bytes: q.bytes as usize,
            });
        }
        broker.groups.join(key, || group.clone(), |_| {});
        restored_groups.push(group);
    }

    let mut given_back = Staged::default();
    for s in sessions {
        // A session that was connected when the broker stopped lost its connection now.
        let disconnected = s.disconnected_at_ms.unwrap_or(unix);
        let away_ms = unix.saturating_sub(disconnected);
        let expires_at = if s.expiry_interval == u32::MAX {
            None
        } else {
            let lifetime_ms = u64::from(s.expiry_interval) * 1000;
            if away_ms >= lifetime_ms {
                // Expired while the broker was down: end it, publishing its will.
                out.expired_sessions += 1;
                if let Some(w) = &s.will {
                    broker.publish_will(&w.to_will(), s.session_id);
                }
                cleanup.push(Op::DeleteSession {
                    client_id: s.client_id.clone(),
                    session_id: s.session_id,
                });
                rec.queues.remove(&s.session_id);
                rec.inflight.remove(&s.session_id);
                rec.qos2.remove(&s.session_id);
                rec.subscriptions.remove(&s.client_id);
                continue;
            }
            Some(now + Duration::from_millis(lifetime_ms - away_ms))
        };

        let mut state = SessionState::default();
        let mut held = Vec::new();
        let subs = rec.subscriptions.remove(&s.client_id).unwrap_or_default();
        for sub in &subs {
            state.subscriptions.insert(
                sub.filter.clone(),
                Subscription {
                    options: sub.options,
                    id: sub.id,
                },
            );
        }
        for (r, m) in rec.inflight.remove(&s.session_id).unwrap_or_default() {
            let mut sub_ids = SubIds::None;
            for id in &r.entry.sub_ids {
                sub_ids.push(*id);
            }
            let msg: Arc<Message> = Arc::new(m.to_message(now, unix));
            let mut d = Delivery::new(msg, r.entry.qos, r.entry.retain, sub_ids);
            d.order = r.order;
            d.stored = true;
            // A shared subscription group's message still goes back to its group if this
            // member leaves without finishing it.
            let group = r
                .group
                .and_then(|id| restored_groups.iter().find(|g| g.queue.id == id));
            d.group = group.map(|g| g.id());
            if let Some(g) = group {
                if !r.released && d.qos == QoS::AtLeastOnce {
                    // The restart disconnected every member: an unacknowledged QoS 1 message
                    // goes back to the group now, as at any disconnect.
                    shared::give_back_stored(g, s.session_id, r.packet_id, &d, &mut given_back);
                    continue;
                }
                held.push(g.clone());
            }
            state.next_order = state.next_order.max(r.order + 1);
            let o = if r.released {
                Outbound::Released(d)
            } else {
                Outbound::Published(d)
            };
            state.inflight.restore(r.packet_id, o);
            out.inflight += 1;
        }
        state
            .inbound_qos2
            .extend(rec.qos2.remove(&s.session_id).unwrap_or_default());

        let handle = broker
            .registry
            .restore(&s.client_id, s.session_id, state, expires_at);
        // Deliveries while the client is away are checked against the ACL as its last user.
        handle.set_username(s.username.as_deref().map(std::sync::Arc::from));
        for sub in &subs {
            match shared::membership(&sub.filter) {
                Some(Ok(Membership::Shared { share, filter })) => {
                    broker.subscribe_shared(&handle, share, filter, sub.options, sub.id, false, 0);
                }
                Some(Ok(Membership::Queue(name))) => {
                    // A queue that ended meanwhile is gone: the subscription stays inert.
                    broker.subscribe_queue(&handle, name, sub.options, sub.id, false, 0);
                }
                Some(Err(())) => {}
                None => {
                    broker.subscribe(&handle, &sub.filter, sub.options, sub.id);
                }
            }
        }
        // What the member holds of its groups takes credit, as before the restart.
        for g in held {
            g.hold(handle.id);
        }
        out.subscriptions += subs.len();
        if let Some(q) = rec.queues.remove(&s.session_id) {
            out.queued += q.len;
            handle.outbox.restore(SpillState {
                head: q.head,
                next_seq: q.tail,
                len: q.len as usize,
                bytes: q.bytes as usize,
            });
        }
        if let Some(w) = &s.will {
            // The client is gone (abnormally, or the will would have been cleared): the will
            // fires when its delay, counted from the disconnect, has passed.
            let left = u64::from(w.delay_interval).saturating_sub(away_ms / 1000);
            let left = expires_at.map_or(left, |t| {
                left.min(t.saturating_duration_since(now).as_secs())
            });
            let abort = broker.spawn_delayed_will(w.to_will(), left as u32, s.clone());
            broker
                .registry
                .set_pending_will(&s.client_id, s.session_id, abort);
        }
        out.sessions += 1;
    }

    broker.commit_detached(given_back);

    // A group whose members all ended while the broker was down ends too (a declared queue
    // lives on: `Broker::declare_queues`, next, decides about it).
    for group in restored_groups {
        if group.member_count() == 0 && group.kind == Kind::Shared {
            out.queued -= group.queue.outbox.len() as u64;
            broker.drop_group(&group);
        } else {
            tokio::spawn(group.clone().run(Arc::downgrade(broker)));
        }
    }

    // State of sessions that have no record (left behind by an interrupted deletion).
    let orphans: Vec<u64> = rec
        .queues
        .keys()
        .chain(rec.inflight.keys())
        .chain(rec.qos2.keys())
        .copied()
        .collect();
    for session_id in orphans {
        cleanup.push(Op::DeleteSession {
            client_id: String::new(),
            session_id,
        });
    }
    if !cleanup.is_empty() {
        let _ = broker.store.submit(cleanup);
    }
    out
}
