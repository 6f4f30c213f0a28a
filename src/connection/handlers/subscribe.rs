//! SUBSCRIBE and UNSUBSCRIBE: the session's subscriptions, each filter checked and authorised
//! on its own, stored when the session is durable, and acknowledged (SUBACK, UNSUBACK) behind
//! that commit. Also what a new subscription brings at once: the retained messages it matches,
//! queued right after its SUBACK. A shared subscription (`$share/{group}/{filter}`) joins or
//! leaves its group through `shared.rs` instead of the broker's topic trie, and so does a
//! declared queue's consumer (`$queue/NAME`), which only a declared queue accepts.

use crate::broker::shared::{membership, queue_key, Membership};
use crate::connection::client::Client;
use crate::connection::close::Close;
use crate::connection::responses::Response;
use crate::outbox::{Delivery, SubIds};
use crate::protocol::ProtocolError;
use crate::protocol::*;
use crate::session::Subscription;
use crate::storage::record::SubscriptionRecord;
use crate::storage::{Commit, Op};
use bytes::BytesMut;

impl Client {
    /// Subscriptions made (or refused, each filter with its own reason code), SUBACK behind
    /// the commit that stores them, then the retained messages they match.
    pub(super) fn handle_subscribe(
        &mut self,
        s: Subscribe,
        wbuf: &mut BytesMut,
    ) -> Result<(), Close> {
        if s.filters
            .iter()
            .any(|(f, o)| o.no_local && validate::shared_subscription(f.as_str()).is_some())
        {
            // [MQTT-3.8.3-4]
            return Err(Close::Protocol(ProtocolError::Protocol(
                "No Local on a shared subscription",
            )));
        }
        let broker = self.broker.clone();
        let max_qos = QoS::from_u8(broker.config.mqtt.max_qos).unwrap_or(QoS::ExactlyOnce);
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        let mut ops = Vec::new();
        let mut groups_ready = Commit::Done;
        let mut found = Vec::new();
        for (filter, mut options) in s.filters {
            let mounted = self.mounted_filter(filter.as_str());
            let f = mounted.as_ref();
            let shared = membership(f);
            if matches!(shared, Some(Err(()))) {
                codes.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            if let Some(Ok(Membership::Queue(name))) = shared {
                if broker.groups.get(&queue_key(name)).is_none() {
                    // Only a declared queue may be consumed (3.x: 0x80).
                    codes.push(ReasonCode::TopicFilterInvalid);
                    continue;
                }
            }
            if !validate::is_valid_topic_filter(f) || !self.limits.topic_within(f) {
                codes.push(ReasonCode::TopicFilterInvalid);
                continue;
            }
            if !broker.auth.can_subscribe_in(
                self.acl_mode,
                self.username.as_deref(),
                &self.client_id,
                f,
            ) || !self.may_subscribe(f)
                || !self.http_allows(crate::auth::http::Action::Subscribe, f)
            {
                codes.push(ReasonCode::NotAuthorized);
                continue;
            }
            let max_subs = self.limits.max_subscriptions;
            if max_subs > 0
                && self.state.subscriptions.len() >= max_subs
                && !self.state.subscriptions.contains_key(f)
            {
                // limits.max_subscriptions; re-subscribing to a filter it has is fine.
                codes.push(ReasonCode::QuotaExceeded);
                continue;
            }
            options.qos = options.qos.min(max_qos);
            let sub = Subscription {
                options,
                id: s.subscription_identifier,
            };
            let existed = self
                .state
                .subscriptions
                .insert(f.to_string(), sub)
                .is_some();
            match shared {
                Some(Ok(Membership::Shared { share, filter })) => {
                    let ready = self.join_group(share, filter, options, s.subscription_identifier);
                    groups_ready = Commit::both(groups_ready, ready);
                }
                Some(Ok(Membership::Queue(name))) => {
                    // Declared (checked above); a queue never ends while it is declared.
                    self.join_queue(name, options, s.subscription_identifier);
                }
                _ => {
                    broker.subscribe(&self.handle, f, options, s.subscription_identifier);
                }
            }
            if self.stores_session() {
                ops.push(Op::PutSubscription {
                    client_id: self.client_id.to_string(),
                    sub: SubscriptionRecord {
                        filter: f.to_string(),
                        options,
                        id: s.subscription_identifier,
                    },
                });
            }
            codes.push(ReasonCode::granted(options.qos));
            // Retained messages: Retain Handling 0 always, 1 only for a new subscription,
            // 2 never ([MQTT-3.3.1-9] .. [MQTT-3.3.1-11]); always with RETAIN=1 ([MQTT-3.3.1-8]).
            // Never for a shared subscription (MQTT 5 §4.8.2).
            let send_retained = match options.retain_handling {
                _ if shared.is_some() => false,
                0 => true,
                1 => !existed,
                _ => false,
            };
            if send_retained && broker.config.mqtt.retain_available {
                found.clear();
                broker.retained_for(f, &mut found);
                for msg in found.drain(..) {
                    if !broker.auth.can_receive(
                        self.username.as_deref(),
                        &self.client_id,
                        msg.topic.as_str(),
                    ) {
                        continue;
                    }
                    let mut sub_ids = SubIds::None;
                    if let Some(id) = s.subscription_identifier {
                        sub_ids.push(id);
                    }
                    let qos = options.qos.min(msg.qos);
                    retained.push(Delivery::new(msg, qos, true, sub_ids));
                }
            }
        }
        // 3.x has one failure code (0x80): `encode_suback` maps every refusal to it.
        // SUBACK after the subscription is stored.
        let commit = Commit::both(self.submit_subscriptions(ops), groups_ready);
        self.queue_ack(commit, Response::SubAck(s.packet_id, codes), retained, wbuf);
        Ok(())
    }

    /// Subscriptions removed (a group left for a shared one), UNSUBACK behind the commit that
    /// deletes them.
    pub(super) fn handle_unsubscribe(&mut self, u: Unsubscribe, wbuf: &mut BytesMut) {
        let mut codes = Vec::with_capacity(u.filters.len());
        let mut ops = Vec::new();
        for filter in u.filters {
            let mounted = self.mounted_filter(filter.as_str());
            let f = mounted.as_ref();
            let removed = self.state.subscriptions.remove(f).is_some();
            if removed {
                if membership(f).is_some() {
                    self.leave_group(f);
                } else {
                    self.broker.unsubscribe(&self.handle, f);
                }
                if self.stores_session() {
                    ops.push(Op::DeleteSubscription {
                        client_id: self.client_id.to_string(),
                        filter: f.to_string(),
                    });
                }
            }
            codes.push(if removed {
                ReasonCode::Success
            } else {
                ReasonCode::NoSubscriptionExisted
            });
        }
        let commit = self.submit_subscriptions(ops);
        self.queue_ack(
            commit,
            Response::UnsubAck(u.packet_id, codes),
            Vec::new(),
            wbuf,
        );
    }

    /// A filter from the client under its listener's mount point: a shared subscription's
    /// filter part (`$share/NAME/` stays in front); declared queues (`$queue/NAME`) and the
    /// broker's `$` topics are not mounted.
    pub(in crate::connection) fn mounted_filter<'a>(
        &self,
        f: &'a str,
    ) -> std::borrow::Cow<'a, str> {
        if self
            .extras
            .as_ref()
            .and_then(|e| e.mount.as_ref())
            .is_none()
        {
            return std::borrow::Cow::Borrowed(f);
        }
        match validate::shared_subscription(f) {
            Some((share, rest)) => {
                std::borrow::Cow::Owned(format!("$share/{share}/{}", self.mounted(rest)))
            }
            None => self.mounted(f),
        }
    }

    /// The commit a SUBACK or UNSUBACK waits for: the stored changes to the subscriptions, or
    /// none when nothing was stored (not durable, or every filter refused). An empty submit
    /// would still make the acknowledgement wait for the store's next commit.
    fn submit_subscriptions(&self, ops: Vec<Op>) -> Commit {
        // What the admin API lists while this connection holds the state.
        self.handle
            .set_subscriptions(self.state.subscription_records());
        if ops.is_empty() {
            return Commit::Done;
        }
        let local = self.broker.store.submit(ops);
        match self.broker.peers() {
            // In a cluster the session's subscriptions are also kept where another node
            // finds them should this one die (`cluster/anchors.rs`).
            Some(peers)
                if self
                    .handle
                    .persistent
                    .load(std::sync::atomic::Ordering::Relaxed) =>
            {
                let subs = self.state.subscription_records();
                let drained = self.drained(peers.position());
                peers.store_subscriptions(&self.client_id, subs, drained, local)
            }
            _ => local,
        }
    }
}
