//! One running bridge: its outgoing queue's member, its link, and the task between them.
//!
//! **Out.** The bridge's outgoing queue is a declared group of kind `Bridge` (`$bridge/NAME`,
//! `broker/shared/`): the broker routes every local message its `out` filters match into it,
//! stored before the publisher's PUBACK like any persistent queue, whether or not the remote
//! is reachable. The bridge is the group's one member, a member that keeps no state of its
//! own: the group hands it messages as the link's window has room (its *lane*), the bridge
//! sends them, and an entry leaves the group's queue only when the remote acknowledges it.
//! When the link goes down, what was in flight goes back to the front of the queue in its
//! order and is sent again, with DUP, on the next connection: in order per topic, and a
//! duplicate only of what was in the window (`tern_bridge_messages_resent_total`). A kill -9 loses
//! nothing: the entries are on disk until acknowledged.
//!
//! **In.** What the link receives through the `in` rules is mapped to a local topic, checked
//! against the ACL as the user `bridge:NAME`, and published here with the bridge's queue as
//! its origin; it is acknowledged to the remote once stored (the same rule as a client's
//! publish). Its origin keeps it out of the bridge's own queue (the queue's index entries
//! carry No Local), so nothing that came in over a bridge goes back out over it; a 3.1.1
//! remote's echoes of what we sent are dropped by the echo filter (`rules.rs`).

use super::link::{LinkEvent, LinkHandle, OutMessage, PushError};
use super::rules::{self, Echoes};
use crate::broker::shared::Group;
use crate::broker::{Broker, Staged};
use crate::config::BridgeRule;
use crate::message::Message;
use crate::metrics::BridgeMetrics;
use crate::outbox::Delivery;
use crate::protocol::{MqttStr, QoS, SubscriptionOptions};
use crate::session::registry::SessionHandle;
use crate::storage::{Commit, Op};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// A bridge, whichever link it runs with now.
pub(super) struct Spec {
    pub name: String,
    pub broker: Arc<Broker>,
    pub group: Arc<Group>,
    /// The group member standing for the link (not a client session: never stored).
    pub member: Arc<SessionHandle>,
    pub out_rules: Vec<BridgeRule>,
    pub in_rules: Vec<BridgeRule>,
    pub v5: bool,
    /// The link's window, the credit the group gives the member while connected.
    pub window: usize,
    pub metrics: BridgeMetrics,
    /// `bridge:NAME`, the identity the ACL checks incoming messages against.
    pub acl_user: String,
}

/// What the bridge task works with: the bridge and its current link.
pub(super) struct Forwarder {
    pub spec: Arc<Spec>,
    pub link: LinkHandle,
}

impl std::ops::Deref for Forwarder {
    type Target = Spec;

    fn deref(&self) -> &Spec {
        &self.spec
    }
}

/// The task's state between events.
struct State {
    /// Sent and not yet acknowledged, by token (the send order).
    inflight: BTreeMap<u64, Delivery>,
    next_token: u64,
    /// Messages going out again after a lost connection (sent with DUP).
    resend: HashSet<u64>,
    echoes: Echoes,
    connected_once: bool,
    /// Queue entries acknowledged by the remote, to delete in one submit.
    done: Vec<Op>,
}

impl Forwarder {
    /// Runs until `stop` (or the link ends); then gives back what it held to the queue.
    pub(super) async fn run(
        self,
        mut events: mpsc::Receiver<LinkEvent>,
        mut stop: watch::Receiver<bool>,
    ) {
        let options = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            retain_as_published: true,
            ..SubscriptionOptions::default()
        };
        self.group.join(&self.member, options, None, false, 0);
        let mut st = State {
            inflight: BTreeMap::new(),
            next_token: 1,
            resend: HashSet::new(),
            echoes: Echoes::default(),
            connected_once: false,
            done: Vec::new(),
        };
        loop {
            self.fill(&mut st);
            self.flush(&mut st);
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev, &mut st),
                    None => break,
                },
                _ = self.member.outbox.ready() => {}
                _ = self.link.room_changed() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        self.give_back(&mut st);
        self.flush(&mut st);
        self.group.leave(self.member.id);
        self.metrics.connected.set(0);
    }

    /// Sends what the group assigned, as far as the link's window has room.
    fn fill(&self, st: &mut State) {
        let room = self.link.room();
        if room == 0 {
            return;
        }
        let mut out = Vec::new();
        self.group.take_lane(self.member.id, room, room, &mut out);
        let mut back = Vec::new();
        for d in out {
            if let Some(d) = self.send(d, st) {
                back.push(d);
            }
        }
        if !back.is_empty() {
            // The link went away between room() and try_publish: back in their order.
            for _ in &back {
                self.group.release(self.member.id);
            }
            self.group.take_back(back);
        }
    }

    /// Hands one delivery to the link; returns it when the link did not take it.
    fn send(&self, d: Delivery, st: &mut State) -> Option<Delivery> {
        let now = crate::clock::now();
        let Ok(expiry) = d.msg.remaining_expiry(now) else {
            self.broker.metrics.dropped_expired.inc();
            self.finish(d, st);
            return None;
        };
        let Some(mapped) = rules::outbound(&self.out_rules, d.msg.topic.as_str()) else {
            // Its rule went with a reload: nothing to send it by.
            self.finish(d, st);
            return None;
        };
        let mut properties = d.msg.properties.clone();
        properties.message_expiry_interval = expiry;
        properties.topic_alias = None;
        let token = st.next_token;
        let m = OutMessage {
            token,
            topic: MqttStr::from(mapped.topic.as_str()),
            payload: d.msg.payload.clone(),
            qos: d.qos.min(mapped.qos),
            retain: d.retain,
            properties,
            dup: st.resend.remove(&d.msg.id),
        };
        match self.link.try_publish(&m) {
            Ok(_) => {
                st.next_token += 1;
                if !self.v5 && rules::echoes(&self.in_rules, &mapped.topic) {
                    st.echoes.sent(&mapped.topic, &d.msg.payload, now);
                }
                st.inflight.insert(token, d);
                None
            }
            Err(PushError::Full | PushError::NotConnected | PushError::Stopped) => Some(d),
        }
    }

    /// The remote has it (or refused it for good): the entry leaves the queue, the credit
    /// comes back.
    fn finish(&self, d: Delivery, st: &mut State) {
        if let Some(seq) = d.seq {
            st.done.push(Op::Dequeue {
                session_id: self.group.queue.id,
                seq,
            });
        }
        self.group.release(self.member.id);
        if let Some(peers) = self.broker.peers() {
            peers.group_done(d.msg.id);
        }
    }

    fn flush(&self, st: &mut State) {
        if !st.done.is_empty() && self.broker.store.durable() {
            let _ = self.broker.store.submit(std::mem::take(&mut st.done));
        }
        st.done.clear();
    }

    fn on_event(&self, ev: LinkEvent, st: &mut State) {
        match ev {
            LinkEvent::Connected { .. } => {
                self.metrics.connected.set(1);
                if st.connected_once {
                    self.metrics.reconnects.inc();
                }
                st.connected_once = true;
                self.group.set_online(self.member.id, true, self.window);
            }
            LinkEvent::ConnectFailed { .. } => {}
            LinkEvent::Disconnected { .. } => {
                self.metrics.connected.set(0);
                self.give_back(st);
            }
            LinkEvent::Acked { token, reason } => {
                if let Some(d) = st.inflight.remove(&token) {
                    if reason >= 0x80 {
                        // Refused by the remote (not authorised there, too large, ...): it
                        // will never go; one line per message would flood the log.
                        self.metrics.refused.inc();
                    }
                    self.finish(d, st);
                }
            }
            LinkEvent::Message {
                generation,
                message,
            } => self.receive(generation, message, st),
            LinkEvent::SubscribeRefused { filter, reason } => {
                tracing::warn!(bridge = %self.name, %filter, reason = format!("{reason:#04x}"), "the remote refused an `in` subscription");
            }
        }
    }

    /// The link is down: the lane and what was in flight go back to the queue's front, in
    /// their order, to be sent again (with DUP) on the next connection.
    fn give_back(&self, st: &mut State) {
        self.group.set_online(self.member.id, false, 0);
        let back: Vec<Delivery> = std::mem::take(&mut st.inflight).into_values().collect();
        for d in &back {
            self.group.release(self.member.id);
            st.resend.insert(d.msg.id);
        }
        self.group.take_back(back);
    }

    /// A message from the remote: mapped, authorised as `bridge:NAME`, published here, and
    /// acknowledged to the remote once stored.
    fn receive(&self, generation: u64, m: super::client::Incoming, st: &mut State) {
        let now = crate::clock::now();
        let ack = |link: &LinkHandle| {
            if m.qos != QoS::AtMostOnce {
                link.ack_incoming(generation, m.packet_id);
            }
        };
        let Some(mapped) = rules::inbound(&self.in_rules, m.topic.as_str()) else {
            ack(&self.link);
            return;
        };
        if !self.v5 && st.echoes.is_echo(m.topic.as_str(), &m.payload, now) {
            self.metrics.echoes.inc();
            ack(&self.link);
            return;
        }
        if !self
            .broker
            .auth
            .can_publish(Some(&self.acl_user), &self.acl_user, &mapped.topic)
        {
            self.metrics.not_authorized.inc();
            ack(&self.link);
            return;
        }
        let mut properties = m.properties.clone();
        properties.topic_alias = None;
        let msg = Arc::new(Message {
            id: self.broker.next_message_id(),
            topic: MqttStr::from(mapped.topic.as_str()),
            payload: m.payload.clone(),
            qos: m.qos.min(mapped.qos),
            retain: m.retain,
            expires_at: Message::deadline_from(properties.message_expiry_interval, now),
            properties,
            // The bridge's: No Local on its queue's index entries keeps it from going back out
            // (in a cluster too: the origin crosses with the message).
            origin: self.group.origin,
            received: Some(now),
        });
        let mut staged = Staged::default();
        self.broker.publish(&msg, &mut Vec::new(), &mut staged);
        let local = self.broker.submit_staged(staged);
        let commit = self.broker.forward(&msg, local);
        self.metrics.received.inc();
        if m.qos == QoS::AtMostOnce {
            return;
        }
        match commit {
            Commit::Done => ack(&self.link),
            Commit::Failed => {}
            Commit::Pending(rx) => {
                // Acknowledged when stored; meanwhile the next messages are routed (in order)
                // and their commits are grouped with this one.
                let link = self.link.clone();
                let packet_id = m.packet_id;
                tokio::spawn(async move {
                    if rx.await.is_ok() {
                        link.ack_incoming(generation, packet_id);
                    }
                });
            }
        }
    }
}
