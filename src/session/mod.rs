//! Session state, free of I/O: the part of a client's state that outlives a connection
//! (subscriptions, outbound QoS 1/2 in flight, inbound QoS 2 ids awaiting PUBREL) and the
//! per-connection topic alias tables. The connection task owns it while attached; the
//! registry keeps it while the client is away.

pub mod registry;

use crate::outbox::Delivery;
use crate::protocol::{MqttStr, QoS, SubscriptionOptions};
use crate::storage::record::SubscriptionRecord;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// One subscription as the session remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub options: SubscriptionOptions,
    pub id: Option<u32>,
}

/// State of an outbound QoS 1/2 message.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published(Delivery),
    /// PUBREC received and PUBREL sent, waiting for PUBCOMP (the delivery is kept for the
    /// durable record of this state).
    Released(Delivery),
}

impl Outbound {
    pub fn delivery(&self) -> &Delivery {
        match self {
            Outbound::Published(d) | Outbound::Released(d) => d,
        }
    }

    fn into_delivery(self) -> Delivery {
        match self {
            Outbound::Published(d) | Outbound::Released(d) => d,
        }
    }
}

/// Outbound QoS 1/2 messages in flight, in the order they were sent (the order they must be
/// re-sent in on reconnect, [MQTT-4.4.0-1]/[MQTT-4.6.0-1]).
#[derive(Debug, Default)]
pub struct Inflight {
    entries: VecDeque<(u16, Outbound)>,
    next_id: u16,
}

/// An acknowledgement of the wrong kind for the state of its packet id, such as PUBCOMP for a
/// QoS 1 message: the client is not following the QoS handshake it was sent, which is a
/// protocol error (v5 DISCONNECT 0x82). The text says which for the log. An acknowledgement
/// for an id not in flight is not one of these: clients legitimately repeat acknowledgements
/// after a reconnect, so those stay tolerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrongAck(pub &'static str);

/// What to do after a PUBREC.
#[derive(Debug, PartialEq, Eq)]
pub enum PubRecAction {
    /// Send PUBREL with this reason (0 or 0x92 Packet Identifier not found).
    SendPubRel(u8),
    /// The receiver refused the message (reason >= 0x80): it is finished, nothing to send.
    Finished,
}

impl Inflight {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Assigns a packet identifier not in use ([MQTT-2.3.1-2]) and records the delivery.
    /// The caller keeps `len()` below 65535.
    pub fn insert(&mut self, d: Delivery) -> u16 {
        let id = loop {
            self.next_id = self.next_id.wrapping_add(1);
            if self.next_id == 0 {
                self.next_id = 1;
            }
            let candidate = self.next_id;
            if !self.entries.iter().any(|(id, _)| *id == candidate) {
                break candidate;
            }
        };
        self.entries.push_back((id, Outbound::Published(d)));
        id
    }

    fn position(&self, id: u16) -> Option<usize> {
        // Acknowledgements usually arrive in order: look at the front first.
        match self.entries.front() {
            Some((front, _)) if *front == id => Some(0),
            _ => self.entries.iter().position(|(i, _)| *i == id),
        }
    }

    /// PUBACK: finishes a QoS 1 message and returns it ([MQTT-4.3.2-3]); None when the id is
    /// not in flight. A PUBACK for a QoS 2 message is a [`WrongAck`]: QoS 2 waits for PUBREC
    /// ([MQTT-4.3.3-3]) and then PUBCOMP ([MQTT-4.3.3-5]).
    pub fn on_puback(&mut self, id: u16) -> Result<Option<Delivery>, WrongAck> {
        let Some(i) = self.position(id) else {
            return Ok(None);
        };
        match &self.entries[i].1 {
            Outbound::Published(d) if d.qos == QoS::AtLeastOnce => {
                Ok(self.entries.remove(i).map(|(_, o)| o.into_delivery()))
            }
            _ => Err(WrongAck("PUBACK for a QoS 2 message")),
        }
    }

    /// Removes (in order) and returns the entries `take` selects.
    pub fn take_where(&mut self, mut take: impl FnMut(&Outbound) -> bool) -> Vec<(u16, Outbound)> {
        if !self.entries.iter().any(|(_, o)| take(o)) {
            return Vec::new();
        }
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.entries.len());
        for (id, o) in self.entries.drain(..) {
            if take(&o) {
                taken.push((id, o));
            } else {
                kept.push_back((id, o));
            }
        }
        self.entries = kept;
        taken
    }

    /// PUBREC for a QoS 2 message: the sender then sends PUBREL ([MQTT-4.3.3-4]); a repeated
    /// PUBREC after that gets the PUBREL again, one for an id not in flight PUBREL 0x92. A
    /// PUBREC for a QoS 1 message is a [`WrongAck`]: QoS 1 ends with PUBACK ([MQTT-4.3.2-3]).
    pub fn on_pubrec(&mut self, id: u16, reason: u8) -> Result<PubRecAction, WrongAck> {
        let Some(i) = self.position(id) else {
            return Ok(PubRecAction::SendPubRel(0x92));
        };
        let entry = &mut self.entries[i].1;
        if matches!(entry, Outbound::Published(d) if d.qos != QoS::ExactlyOnce) {
            return Err(WrongAck("PUBREC for a QoS 1 message"));
        }
        if reason >= 0x80 {
            self.entries.remove(i);
            return Ok(PubRecAction::Finished);
        }
        if let Outbound::Published(d) = entry {
            *entry = Outbound::Released(d.clone());
        }
        Ok(PubRecAction::SendPubRel(0))
    }

    /// PUBCOMP: finishes a QoS 2 message whose PUBREL was sent and returns it
    /// ([MQTT-4.3.3-5]); None when the id is not in flight. PUBCOMP for a QoS 1 message, or
    /// for a QoS 2 message still waiting for its PUBREC (no PUBREL sent yet), is a
    /// [`WrongAck`].
    pub fn on_pubcomp(&mut self, id: u16) -> Result<Option<Delivery>, WrongAck> {
        let Some(i) = self.position(id) else {
            return Ok(None);
        };
        match &self.entries[i].1 {
            Outbound::Released(_) => Ok(self.entries.remove(i).map(|(_, o)| o.into_delivery())),
            Outbound::Published(d) if d.qos == QoS::ExactlyOnce => {
                Err(WrongAck("PUBCOMP for a QoS 2 message before its PUBREL"))
            }
            Outbound::Published(_) => Err(WrongAck("PUBCOMP for a QoS 1 message")),
        }
    }

    /// The state of one packet id.
    pub fn get(&self, id: u16) -> Option<&Outbound> {
        self.position(id).map(|i| &self.entries[i].1)
    }

    /// Puts back an entry recovered from the store (call in send order).
    pub fn restore(&mut self, id: u16, o: Outbound) {
        self.entries.push_back((id, o));
        self.next_id = self.next_id.max(id);
    }

    /// Everything in flight, in send order, for re-sending on reconnect.
    pub fn iter(&self) -> impl Iterator<Item = &(u16, Outbound)> {
        self.entries.iter()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Session state that survives a connection.
#[derive(Debug, Default)]
pub struct SessionState {
    pub subscriptions: HashMap<String, Subscription>,
    pub inflight: Inflight,
    /// Inbound QoS 2 packet ids whose PUBREC was sent and PUBREL is awaited: a PUBLISH with
    /// one of these ids is a re-send and is not delivered again (MQTT 5.0 §4.3.3, method B).
    pub inbound_qos2: HashSet<u16>,
    /// Next send order for in-flight records (kept so re-sends after a restart keep order).
    pub next_order: u64,
    /// The connection that held this state last ended the session (Session Expiry 0 when it
    /// closed, e.g. a v5 DISCONNECT setting it to 0) but had already been taken over, so the
    /// registry entry was no longer its to remove. The connection that waited for this state
    /// starts a new session instead of continuing this one (Session Present 0).
    pub ended: bool,
}

impl SessionState {
    /// The subscriptions as the store (and another cluster node) keeps them.
    pub fn subscription_records(&self) -> Vec<SubscriptionRecord> {
        self.subscriptions
            .iter()
            .map(|(filter, s)| SubscriptionRecord {
                filter: filter.clone(),
                options: s.options,
                id: s.id,
            })
            .collect()
    }

    pub fn clear(&mut self) {
        self.subscriptions.clear();
        self.inflight.clear();
        self.inbound_qos2.clear();
    }
}

/// Topic aliases of one connection (v5). They do not survive the connection ([MQTT-3.3.2-7]).
/// The maps are allocated when the first alias is used: most connections never use one, and
/// this struct sits in every connection's task.
#[derive(Debug, Default)]
pub struct TopicAliases {
    /// Our Topic Alias Maximum (what the client may use).
    inbound_max: u16,
    /// The client's Topic Alias Maximum (what we may use).
    outbound_max: u16,
    maps: Option<Box<AliasMaps>>,
}

#[derive(Debug, Default)]
struct AliasMaps {
    inbound: HashMap<u16, MqttStr>,
    outbound: HashMap<Arc<str>, u16>,
}

/// Errors resolving an inbound alias.
#[derive(Debug, PartialEq, Eq)]
pub enum AliasError {
    /// Alias 0 or above our maximum ([MQTT-3.3.2-8] [MQTT-3.3.2-9]).
    Invalid,
    /// Empty topic with an alias we never saw: protocol error.
    Unknown,
}

impl TopicAliases {
    pub fn new(inbound_max: u16, outbound_max: u16) -> TopicAliases {
        TopicAliases {
            inbound_max,
            outbound_max,
            ..TopicAliases::default()
        }
    }

    /// Resolves the topic of an inbound PUBLISH that may carry an alias.
    pub fn resolve_inbound(
        &mut self,
        topic: MqttStr,
        alias: Option<u16>,
    ) -> Result<MqttStr, AliasError> {
        let Some(alias) = alias else {
            return Ok(topic);
        };
        if alias == 0 || alias > self.inbound_max {
            return Err(AliasError::Invalid);
        }
        if topic.is_empty() {
            return self
                .maps
                .as_ref()
                .and_then(|m| m.inbound.get(&alias).cloned())
                .ok_or(AliasError::Unknown);
        }
        self.maps
            .get_or_insert_with(Box::default)
            .inbound
            .insert(alias, topic.clone());
        Ok(topic)
    }

    /// The topic an inbound PUBLISH will resolve to, without registering its alias: `None`
    /// when it will not resolve (the PUBLISH is then refused by [`Self::resolve_inbound`]).
    pub fn peek_inbound(&self, topic: &MqttStr, alias: Option<u16>) -> Option<MqttStr> {
        if !topic.is_empty() {
            return Some(topic.clone());
        }
        let alias = alias.filter(|&a| a != 0 && a <= self.inbound_max)?;
        self.maps.as_ref()?.inbound.get(&alias).cloned()
    }

    /// Whether the client accepts aliases from us at all.
    pub fn outbound_enabled(&self) -> bool {
        self.outbound_max > 0
    }

    /// For an outbound PUBLISH: (alias, send topic too?). Assigns aliases first come first
    /// served up to the client's maximum; later topics go without an alias.
    pub fn outbound(&mut self, topic: &str) -> Option<(u16, bool)> {
        if self.outbound_max == 0 {
            return None;
        }
        let maps = self.maps.get_or_insert_with(Box::default);
        if let Some(&a) = maps.outbound.get(topic) {
            return Some((a, false));
        }
        let next = maps.outbound.len() as u16 + 1;
        if next > self.outbound_max {
            return None;
        }
        maps.outbound.insert(Arc::from(topic), next);
        Some((next, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::outbox::SubIds;
    use crate::protocol::PublishProperties;
    use bytes::Bytes;

    fn d(qos: QoS) -> Delivery {
        Delivery::new(
            Arc::new(Message {
                id: 0,
                topic: MqttStr::from("t"),
                payload: Bytes::new(),
                qos,
                retain: false,
                properties: PublishProperties::default(),
                expires_at: None,
                origin: 0,
                received: None,
            }),
            qos,
            false,
            SubIds::None,
        )
    }

    #[test]
    fn qos1_flow() {
        let mut f = Inflight::default();
        let a = f.insert(d(QoS::AtLeastOnce));
        let b = f.insert(d(QoS::AtLeastOnce));
        assert_ne!(a, b);
        assert!(f.on_puback(b).unwrap().is_some(), "out of order ack");
        assert!(
            matches!(f.on_puback(b), Ok(None)),
            "twice: unknown, tolerated"
        );
        assert!(f.on_puback(a).unwrap().is_some());
        assert!(f.is_empty());
    }

    #[test]
    fn qos2_flow_and_resend_order() {
        let mut f = Inflight::default();
        let a = f.insert(d(QoS::ExactlyOnce));
        let b = f.insert(d(QoS::ExactlyOnce));
        assert_eq!(f.on_pubrec(a, 0), Ok(PubRecAction::SendPubRel(0)));
        assert_eq!(
            f.on_pubrec(a, 0),
            Ok(PubRecAction::SendPubRel(0)),
            "a repeated PUBREC gets the PUBREL again"
        );
        let order: Vec<(u16, bool)> = f
            .iter()
            .map(|(id, o)| (*id, matches!(o, Outbound::Released(_))))
            .collect();
        assert_eq!(order, vec![(a, true), (b, false)]);
        assert!(f.on_pubcomp(a).unwrap().is_some());
        assert_eq!(f.on_pubrec(999, 0), Ok(PubRecAction::SendPubRel(0x92)));
        assert_eq!(f.on_pubrec(b, 0x80), Ok(PubRecAction::Finished));
        assert!(f.is_empty());
    }

    /// The acknowledgement that does not belong to the message's QoS or state is refused and
    /// leaves the message as it was, whatever its position in the window.
    #[test]
    fn wrong_acknowledgement_types_are_refused() {
        let mut f = Inflight::default();
        let one = f.insert(d(QoS::AtLeastOnce));
        let two = f.insert(d(QoS::ExactlyOnce));
        assert_eq!(
            f.on_pubcomp(one).map(|_| ()),
            Err(WrongAck("PUBCOMP for a QoS 1 message"))
        );
        assert_eq!(
            f.on_pubrec(one, 0),
            Err(WrongAck("PUBREC for a QoS 1 message"))
        );
        assert_eq!(
            f.on_pubrec(one, 0x80),
            Err(WrongAck("PUBREC for a QoS 1 message")),
            "a failing PUBREC is still the wrong packet for QoS 1"
        );
        assert_eq!(
            f.on_puback(two).map(|_| ()),
            Err(WrongAck("PUBACK for a QoS 2 message"))
        );
        assert_eq!(
            f.on_pubcomp(two).map(|_| ()),
            Err(WrongAck("PUBCOMP for a QoS 2 message before its PUBREL"))
        );
        assert_eq!(f.len(), 2, "nothing finished by a wrong acknowledgement");
        assert!(matches!(f.get(one), Some(Outbound::Published(_))));
        assert!(matches!(f.get(two), Some(Outbound::Published(_))));
        // After PUBREC the QoS 2 message waits for PUBCOMP: PUBACK is still wrong.
        assert_eq!(f.on_pubrec(two, 0), Ok(PubRecAction::SendPubRel(0)));
        assert_eq!(
            f.on_puback(two).map(|_| ()),
            Err(WrongAck("PUBACK for a QoS 2 message"))
        );
        assert!(matches!(f.get(two), Some(Outbound::Released(_))));
        // The right ones still work.
        assert!(f.on_puback(one).unwrap().is_some());
        assert!(f.on_pubcomp(two).unwrap().is_some());
        assert!(f.is_empty());
    }

    /// Acknowledgements for ids not in flight are tolerated (a client may repeat them after a
    /// reconnect): nothing happens, PUBREC is answered with PUBREL 0x92.
    #[test]
    fn unknown_ids_are_tolerated() {
        let mut f = Inflight::default();
        let one = f.insert(d(QoS::AtLeastOnce));
        assert_eq!(f.on_puback(7).map(|o| o.is_none()), Ok(true));
        assert_eq!(f.on_pubcomp(7).map(|o| o.is_none()), Ok(true));
        assert_eq!(f.on_pubrec(7, 0), Ok(PubRecAction::SendPubRel(0x92)));
        assert_eq!(f.on_pubrec(7, 0x80), Ok(PubRecAction::SendPubRel(0x92)));
        assert_eq!(f.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![one]);
    }

    #[test]
    fn take_where_keeps_the_order_of_the_rest() {
        let mut f = Inflight::default();
        let a = f.insert(d(QoS::AtLeastOnce));
        let b = f.insert(d(QoS::ExactlyOnce));
        let c = f.insert(d(QoS::AtLeastOnce));
        let taken = f.take_where(|o| o.delivery().qos == QoS::AtLeastOnce);
        assert_eq!(
            taken.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            vec![a, c]
        );
        assert_eq!(f.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![b]);
        assert!(f.take_where(|_| false).is_empty());
    }

    #[test]
    fn packet_ids_skip_ids_in_use_and_zero() {
        let mut f = Inflight::default();
        let first = f.insert(d(QoS::AtLeastOnce));
        assert_eq!(first, 1);
        f.next_id = u16::MAX;
        let wrapped = f.insert(d(QoS::AtLeastOnce));
        assert_eq!(wrapped, 2, "skips 0 and 1 (in use)");
    }

    #[test]
    fn aliases() {
        let mut a = TopicAliases::new(2, 1);
        assert_eq!(
            a.resolve_inbound(MqttStr::from("x"), Some(0)),
            Err(AliasError::Invalid)
        );
        assert_eq!(
            a.resolve_inbound(MqttStr::from("x"), Some(3)),
            Err(AliasError::Invalid)
        );
        assert_eq!(
            a.resolve_inbound(MqttStr::from(""), Some(1)),
            Err(AliasError::Unknown)
        );
        assert_eq!(
            a.resolve_inbound(MqttStr::from("x"), Some(1))
                .unwrap()
                .as_str(),
            "x"
        );
        assert_eq!(
            a.resolve_inbound(MqttStr::from(""), Some(1))
                .unwrap()
                .as_str(),
            "x"
        );
        assert_eq!(a.outbound("t"), Some((1, true)));
        assert_eq!(a.outbound("t"), Some((1, false)));
        assert_eq!(a.outbound("u"), None);
    }
}
