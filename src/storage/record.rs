//! The records the durable store keeps, and their on-disk encoding.
//!
//! The encoding is hand-written rather than derived (serde + bincode) so that the bytes on disk
//! are a format this module owns and documents: every value starts with a format byte
//! ([`RECORD_FORMAT`]), integers are big-endian, strings and byte strings carry a `u32` length,
//! optional fields a presence byte or bit. A newer format byte is reported as such (so an old
//! binary refuses a store written by a newer one instead of misreading it), and decoding checks
//! every length against the bytes actually present: garbage yields a [`DecodeError`], never a
//! panic or an allocation sized by an untrusted count.

use super::codec::{
    put_bytes, put_len, put_opt_u64, put_properties, put_u16, put_u32, put_u64, Reader,
};
pub use super::codec::{DecodeError, RECORD_FORMAT};
use crate::message::Message;
use crate::protocol::{MqttStr, PublishProperties, QoS, SubscriptionOptions, Will};
use bytes::Bytes;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Wall-clock time in milliseconds since the Unix epoch. Deadlines are stored in wall-clock
/// time because an `Instant` means nothing after a restart.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An application message as stored: once, however many sessions hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: u64,
    pub topic: MqttStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: PublishProperties,
    /// Absolute expiry deadline in Unix milliseconds.
    pub expires_at_ms: Option<u64>,
    pub origin: u64,
}

/// A Will Message kept with its session, so it can still be published after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillRecord {
    pub topic: MqttStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub delay_interval: u32,
    pub properties: PublishProperties,
}

/// A persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub client_id: String,
    pub session_id: u64,
    pub expiry_interval: u32,
    /// Wall-clock time of the disconnect in Unix milliseconds; None while connected.
    pub disconnected_at_ms: Option<u64>,
    pub will: Option<WillRecord>,
    /// The user name of the session's last connection: after a restart, deliveries to the
    /// session while its client is away are checked against the ACL as that user. Written
    /// after the will so that records from before this field read back as None.
    pub username: Option<String>,
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRecord {
    pub filter: String,
    pub options: SubscriptionOptions,
    pub id: Option<u32>,
}

/// A message waiting in a session's queue, by reference to the stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub msg_id: u64,
    /// Delivery QoS (the minimum of the message's and the subscription's).
    pub qos: QoS,
    /// RETAIN flag to deliver with.
    pub retain: bool,
    /// Subscription identifiers of the matching subscriptions.
    pub sub_ids: Vec<u32>,
    /// Unix second it entered a declared queue (0: not one, or an entry of format 3 or
    /// older): `message_ttl` counts from it. Kept only in the queue entry's own record; an
    /// in-flight record does not need it.
    pub enqueued: u32,
}

/// An outbound QoS 1/2 delivery waiting for its acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InflightRecord {
    pub packet_id: u16,
    /// Send order, to resend in the original order after a restart.
    pub order: u64,
    pub entry: QueueEntry,
    /// PUBREC received and PUBREL sent: only PUBCOMP is awaited (the message itself is no
    /// longer resent, but it stays referenced until then for simplicity of the refcount).
    pub released: bool,
    /// The storage id of the shared subscription group the message came through, so that after
    /// a restart it can still go back to the group if the member leaves without finishing it.
    pub group: Option<u64>,
}

impl StoredMessage {
    /// Rebuilds the broker's message, turning the wall-clock deadline into an `Instant`. A
    /// deadline already past stays in the past (by as much as it is past): a reader whose own
    /// "now" was taken a moment before this one must still see it expired.
    pub fn to_message(&self, now_instant: Instant, now_unix_ms: u64) -> Message {
        let expires_at = self.expires_at_ms.and_then(|at| {
            if at <= now_unix_ms {
                let ago = Duration::from_millis(now_unix_ms - at);
                // Clamped at `now_instant - ago` being unrepresentable (just after boot):
                // one millisecond before is still in the past for any later reader.
                return Some(
                    now_instant
                        .checked_sub(ago.max(Duration::from_millis(1)))
                        .unwrap_or(now_instant),
                );
            }
            // An unrepresentable deadline is far enough away to mean "never".
            now_instant.checked_add(Duration::from_millis(at - now_unix_ms))
        });
        Message {
            id: self.id,
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            properties: self.properties.clone(),
            expires_at,
            origin: self.origin,
            received: None,
        }
    }

    pub fn from_message(m: &Message, now_instant: Instant, now_unix_ms: u64) -> StoredMessage {
        let expires_at_ms = m.expires_at.map(|d| {
            let left = d.saturating_duration_since(now_instant).as_millis();
            now_unix_ms.saturating_add(u64::try_from(left).unwrap_or(u64::MAX))
        });
        StoredMessage {
            id: m.id,
            topic: m.topic.clone(),
            payload: m.payload.clone(),
            qos: m.qos,
            retain: m.retain,
            properties: m.properties.clone(),
            expires_at_ms,
            origin: m.origin,
        }
    }

    /// Bytes the message accounts for in queue limits (as `Message::weight`).
    pub fn weight(&self) -> u64 {
        (self.payload.len() + self.topic.len()) as u64
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(48 + self.topic.len() + self.payload.len());
        w.push(RECORD_FORMAT);
        put_u64(&mut w, self.id);
        put_bytes(&mut w, self.topic.as_bytes());
        put_bytes(&mut w, &self.payload);
        w.push(self.qos.as_u8());
        w.push(u8::from(self.retain));
        put_opt_u64(&mut w, self.expires_at_ms);
        put_u64(&mut w, self.origin);
        put_properties(&mut w, &self.properties);
        w
    }

    /// Decodes a message; topic, payload and properties share one copy of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<StoredMessage, DecodeError> {
        let mut r = Reader::new(Bytes::copy_from_slice(bytes));
        r.header()?;
        let m = StoredMessage {
            id: r.u64()?,
            topic: r.mqtt_str()?,
            payload: r.bytes()?,
            qos: r.qos()?,
            retain: r.bool()?,
            expires_at_ms: r.opt_u64()?,
            origin: r.u64()?,
            properties: r.properties()?,
        };
        r.finish()?;
        Ok(m)
    }
}

impl From<&Will> for WillRecord {
    fn from(w: &Will) -> Self {
        WillRecord {
            topic: w.topic.clone(),
            payload: w.payload.clone(),
            qos: w.qos,
            retain: w.retain,
            delay_interval: w.delay_interval,
            properties: w.properties.clone(),
        }
    }
}

impl From<WillRecord> for Will {
    fn from(w: WillRecord) -> Self {
        Will {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            delay_interval: w.delay_interval,
            properties: w.properties,
        }
    }
}

impl WillRecord {
    pub fn to_will(&self) -> Will {
        Will::from(self.clone())
    }

    fn put(&self, w: &mut Vec<u8>) {
        put_bytes(w, self.topic.as_bytes());
        put_bytes(w, &self.payload);
        w.push(self.qos.as_u8());
        w.push(u8::from(self.retain));
        put_u32(w, self.delay_interval);
        put_properties(w, &self.properties);
    }

    fn read(r: &mut Reader) -> Result<WillRecord, DecodeError> {
        Ok(WillRecord {
            topic: r.mqtt_str()?,
            payload: r.bytes()?,
            qos: r.qos()?,
            retain: r.bool()?,
            delay_interval: r.u32()?,
            properties: r.properties()?,
        })
    }
}

impl SessionRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(32 + self.client_id.len());
        w.push(RECORD_FORMAT);
        put_bytes(&mut w, self.client_id.as_bytes());
        put_u64(&mut w, self.session_id);
        put_u32(&mut w, self.expiry_interval);
        put_opt_u64(&mut w, self.disconnected_at_ms);
        match &self.will {
            None => w.push(0),
            Some(will) => {
                w.push(1);
                will.put(&mut w);
            }
        }
        match &self.username {
            None => w.push(0),
            Some(user) => {
                w.push(1);
                put_bytes(&mut w, user.as_bytes());
            }
        }
        w
    }

    pub fn decode(bytes: &[u8]) -> Result<SessionRecord, DecodeError> {
        let mut r = Reader::new(Bytes::copy_from_slice(bytes));
        let format = r.header()?;
        let s = SessionRecord {
            client_id: r.string()?,
            session_id: r.u64()?,
            expiry_interval: r.u32()?,
            disconnected_at_ms: r.opt_u64()?,
            will: if r.bool()? {
                Some(WillRecord::read(&mut r)?)
            } else {
                None
            },
            // Formats before 3 did not keep the user name.
            username: if format >= 3 && r.bool()? {
                Some(r.string()?)
            } else {
                None
            },
        };
        r.finish()?;
        Ok(s)
    }
}

impl SubscriptionRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(16 + self.filter.len());
        w.push(RECORD_FORMAT);
        put_bytes(&mut w, self.filter.as_bytes());
        w.push(self.options.qos.as_u8());
        w.push(u8::from(self.options.no_local) | u8::from(self.options.retain_as_published) << 1);
        w.push(self.options.retain_handling);
        match self.id {
            None => w.push(0),
            Some(id) => {
                w.push(1);
                put_u32(&mut w, id);
            }
        }
        w
    }

    pub fn decode(bytes: &[u8]) -> Result<SubscriptionRecord, DecodeError> {
        let mut r = Reader::new(Bytes::copy_from_slice(bytes));
        r.header()?;
        let filter = r.string()?;
        let qos = r.qos()?;
        let flags = r.u8()?;
        if flags & !0b11 != 0 {
            return Err(DecodeError::Invalid("unknown subscription option flags"));
        }
        let retain_handling = r.u8()?;
        if retain_handling > 2 {
            return Err(DecodeError::Invalid("retain handling above 2"));
        }
        let id = if r.bool()? { Some(r.u32()?) } else { None };
        r.finish()?;
        Ok(SubscriptionRecord {
            filter,
            options: SubscriptionOptions {
                qos,
                no_local: flags & 1 != 0,
                retain_as_published: flags & 2 != 0,
                retain_handling,
            },
            id,
        })
    }
}

impl QueueEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(20 + 4 * self.sub_ids.len());
        w.push(RECORD_FORMAT);
        self.put(&mut w);
        put_u32(&mut w, self.enqueued);
        w
    }

    pub fn decode(bytes: &[u8]) -> Result<QueueEntry, DecodeError> {
        let mut r = Reader::new(Bytes::copy_from_slice(bytes));
        let format = r.header()?;
        let mut e = QueueEntry::read(&mut r)?;
        if format >= 4 {
            e.enqueued = r.u32()?;
        }
        r.finish()?;
        Ok(e)
    }

    fn put(&self, w: &mut Vec<u8>) {
        put_u64(w, self.msg_id);
        w.push(self.qos.as_u8());
        w.push(u8::from(self.retain));
        put_len(w, self.sub_ids.len());
        for &id in &self.sub_ids {
            put_u32(w, id);
        }
    }

    fn read(r: &mut Reader) -> Result<QueueEntry, DecodeError> {
        let msg_id = r.u64()?;
        let qos = r.qos()?;
        let retain = r.bool()?;
        let n = r.count(4)?;
        let mut sub_ids = Vec::with_capacity(n);
        for _ in 0..n {
            sub_ids.push(r.u32()?);
        }
        Ok(QueueEntry {
            msg_id,
            qos,
            retain,
            sub_ids,
            enqueued: 0,
        })
    }
}

impl InflightRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(32 + 4 * self.entry.sub_ids.len());
        w.push(RECORD_FORMAT);
        put_u16(&mut w, self.packet_id);
        put_u64(&mut w, self.order);
        w.push(u8::from(self.released));
        self.entry.put(&mut w);
        put_opt_u64(&mut w, self.group);
        w
    }

    pub fn decode(bytes: &[u8]) -> Result<InflightRecord, DecodeError> {
        let mut r = Reader::new(Bytes::copy_from_slice(bytes));
        let format = r.header()?;
        let mut rec = InflightRecord {
            packet_id: r.u16()?,
            order: r.u64()?,
            released: r.bool()?,
            entry: QueueEntry::read(&mut r)?,
            group: None,
        };
        if format >= 2 {
            rec.group = r.opt_u64()?;
        }
        r.finish()?;
        Ok(rec)
    }
}

/// A persistent session's state as it moves from one cluster node to another (never kept on
/// disk): the reading position of the sending node in the cluster's messages stream, then the
/// subscriptions, the in-flight deliveries with their packet ids, the inbound QoS 2 ids and the
/// queue, each record in its own encoding above. The messages travel whole: their ids are the
/// sending node's and mean nothing to the receiver, which stores them under its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionSnapshot {
    /// Messages stream sequence up to which the sender routed into this session.
    pub position: u64,
    pub subscriptions: Vec<SubscriptionRecord>,
    pub inflight: Vec<(InflightRecord, StoredMessage)>,
    pub qos2: Vec<u16>,
    pub queue: Vec<(QueueEntry, StoredMessage)>,
}

impl SessionSnapshot {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(64);
        w.push(RECORD_FORMAT);
        put_u64(&mut w, self.position);
        put_len(&mut w, self.subscriptions.len());
        for s in &self.subscriptions {
            put_bytes(&mut w, &s.encode());
        }
        put_len(&mut w, self.inflight.len());
        for (rec, m) in &self.inflight {
            put_bytes(&mut w, &rec.encode());
            put_bytes(&mut w, &m.encode());
        }
        put_len(&mut w, self.qos2.len());
        for &id in &self.qos2 {
            put_u16(&mut w, id);
        }
        put_len(&mut w, self.queue.len());
        for (e, m) in &self.queue {
            put_bytes(&mut w, &e.encode());
            put_bytes(&mut w, &m.encode());
        }
        w
    }

    pub fn decode(bytes: &[u8]) -> Result<SessionSnapshot, DecodeError> {
        let mut r = Reader::new(Bytes::copy_from_slice(bytes));
        r.header()?;
        let mut s = SessionSnapshot {
            position: r.u64()?,
            ..Default::default()
        };
        for _ in 0..r.count(4)? {
            s.subscriptions
                .push(SubscriptionRecord::decode(&r.bytes()?)?);
        }
        for _ in 0..r.count(8)? {
            let rec = InflightRecord::decode(&r.bytes()?)?;
            s.inflight.push((rec, StoredMessage::decode(&r.bytes()?)?));
        }
        for _ in 0..r.count(2)? {
            s.qos2.push(r.u16()?);
        }
        for _ in 0..r.count(8)? {
            let e = QueueEntry::decode(&r.bytes()?)?;
            s.queue.push((e, StoredMessage::decode(&r.bytes()?)?));
        }
        r.finish()?;
        Ok(s)
    }
}

/// A reference to a stored message (the value of a retained topic).
pub fn encode_msg_ref(id: u64) -> Vec<u8> {
    let mut w = Vec::with_capacity(9);
    w.push(RECORD_FORMAT);
    put_u64(&mut w, id);
    w
}

pub fn decode_msg_ref(bytes: &[u8]) -> Result<u64, DecodeError> {
    let mut r = Reader::new(Bytes::copy_from_slice(bytes));
    r.header()?;
    let id = r.u64()?;
    r.finish()?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn props() -> PublishProperties {
        PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some(MqttStr::from("text/plain")),
            response_topic: Some(MqttStr::from("reply/here")),
            correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
            user_properties: vec![
                (MqttStr::from("k"), MqttStr::from("v")),
                (MqttStr::from("k"), MqttStr::from("")),
            ],
            topic_alias: Some(7),
            will_delay_interval: Some(5),
        }
    }

    pub(crate) fn message(id: u64) -> StoredMessage {
        StoredMessage {
            id,
            topic: MqttStr::from("a/b"),
            payload: Bytes::from(vec![0u8, 1, 2, 255]),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: props(),
            expires_at_ms: Some(1_700_000_000_000),
            origin: 42,
        }
    }

    fn session() -> SessionRecord {
        SessionRecord {
            client_id: "client-é".into(),
            session_id: 9,
            expiry_interval: 3600,
            disconnected_at_ms: Some(123),
            will: Some(WillRecord {
                topic: MqttStr::from("will/t"),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::AtLeastOnce,
                retain: false,
                delay_interval: 30,
                properties: props(),
            }),
            username: Some("alice".into()),
        }
    }

    fn inflight() -> InflightRecord {
        InflightRecord {
            packet_id: 65535,
            order: 77,
            entry: QueueEntry {
                msg_id: 5,
                qos: QoS::AtLeastOnce,
                retain: false,
                sub_ids: vec![1, 268_435_455],
                enqueued: 0,
            },
            released: true,
            group: Some(u64::MAX),
        }
    }

    fn subscription() -> SubscriptionRecord {
        SubscriptionRecord {
            filter: "a/+/#".into(),
            options: SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: false,
                retain_handling: 2,
            },
            id: Some(12),
        }
    }

    type Check = fn(&[u8]) -> bool;

    /// Every encoded record with a check that its own decoder accepts given bytes.
    fn all_encoded() -> Vec<(Vec<u8>, Check)> {
        let mut s = session();
        let plain = StoredMessage {
            properties: PublishProperties::default(),
            expires_at_ms: None,
            ..message(1)
        };
        s.will = None;
        let msg: Check = |b| StoredMessage::decode(b).is_ok();
        let ses: Check = |b| SessionRecord::decode(b).is_ok();
        vec![
            (message(3).encode(), msg),
            (plain.encode(), msg),
            (session().encode(), ses),
            (s.encode(), ses),
            (subscription().encode(), |b| {
                SubscriptionRecord::decode(b).is_ok()
            }),
            (inflight().encode(), |b| InflightRecord::decode(b).is_ok()),
            (inflight().entry.encode(), |b| QueueEntry::decode(b).is_ok()),
            (encode_msg_ref(17), |b| decode_msg_ref(b).is_ok()),
            (snapshot().encode(), |b| SessionSnapshot::decode(b).is_ok()),
        ]
    }

    fn snapshot() -> SessionSnapshot {
        SessionSnapshot {
            position: 77,
            subscriptions: vec![subscription()],
            inflight: vec![(inflight(), message(3))],
            qos2: vec![4, 9],
            queue: vec![(inflight().entry, message(5))],
        }
    }

    #[test]
    fn a_session_snapshot_round_trips_and_refuses_a_cut() {
        let s = snapshot();
        let bytes = s.encode();
        assert_eq!(SessionSnapshot::decode(&bytes), Ok(s));
        assert_eq!(
            SessionSnapshot::decode(&SessionSnapshot::default().encode()),
            Ok(SessionSnapshot::default())
        );
        // A chunk lost on the way must not pass for a smaller session.
        for cut in [1, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                SessionSnapshot::decode(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    /// Decodes with every decoder; true when any accepts.
    fn any_decodes(b: &[u8]) -> bool {
        all_encoded().iter().any(|(_, check)| check(b))
    }

    #[test]
    fn records_round_trip() {
        let m = message(3);
        assert_eq!(StoredMessage::decode(&m.encode()), Ok(m));
        let s = session();
        assert_eq!(SessionRecord::decode(&s.encode()), Ok(s.clone()));
        let s = SessionRecord {
            will: None,
            disconnected_at_ms: None,
            username: None,
            ..s
        };
        assert_eq!(SessionRecord::decode(&s.encode()), Ok(s));
        let sub = subscription();
        assert_eq!(SubscriptionRecord::decode(&sub.encode()), Ok(sub.clone()));
        let sub = SubscriptionRecord {
            id: None,
            options: SubscriptionOptions::default(),
            ..sub
        };
        assert_eq!(SubscriptionRecord::decode(&sub.encode()), Ok(sub));
        let i = inflight();
        assert_eq!(QueueEntry::decode(&i.entry.encode()), Ok(i.entry.clone()));
        assert_eq!(InflightRecord::decode(&i.encode()), Ok(i.clone()));
        let no_group = InflightRecord { group: None, ..i };
        assert_eq!(
            InflightRecord::decode(&no_group.encode()),
            Ok(no_group.clone())
        );
        assert_eq!(decode_msg_ref(&encode_msg_ref(u64::MAX)), Ok(u64::MAX));
    }

    #[test]
    fn queue_entries_keep_their_enqueue_time_and_format_3_ones_decode() {
        let e = QueueEntry {
            enqueued: 1_796_000_000,
            ..inflight().entry
        };
        assert_eq!(QueueEntry::decode(&e.encode()), Ok(e.clone()));
        // Format 3 (the previous release): the entry ends after its subscription ids.
        let mut v3 = e.encode();
        v3.truncate(v3.len() - 4);
        v3[0] = 3;
        let old = QueueEntry { enqueued: 0, ..e };
        assert_eq!(QueueEntry::decode(&v3), Ok(old.clone()));
        // An in-flight record of format 3 is laid out as in format 4.
        let rec = inflight();
        let mut v3 = rec.encode();
        v3[0] = 3;
        assert_eq!(InflightRecord::decode(&v3), Ok(rec));
    }

    #[test]
    fn format_1_records_still_decode() {
        // Format 1 in-flight records end after the queue entry (no group).
        let rec = InflightRecord {
            group: None,
            ..inflight()
        };
        let mut v1 = rec.encode();
        assert_eq!(v1.pop(), Some(0), "absent group");
        v1[0] = 1;
        assert_eq!(InflightRecord::decode(&v1), Ok(rec));
        // Format 1 and 2 session records end after the will (no user name).
        let rec = SessionRecord {
            username: None,
            ..session()
        };
        let mut old = rec.encode();
        assert_eq!(old.pop(), Some(0), "absent user name");
        for format in [1, 2] {
            old[0] = format;
            assert_eq!(SessionRecord::decode(&old), Ok(rec.clone()));
        }
    }

    #[test]
    fn truncation_and_trailing_bytes_are_errors() {
        for (full, decodes) in all_encoded() {
            assert!(decodes(&full));
            for len in 0..full.len() {
                let cut = &full[..len];
                assert!(!decodes(cut), "{cut:?} decoded");
            }
            let mut long = full.clone();
            long.push(0);
            assert!(!decodes(&long));
        }
    }

    #[test]
    fn format_byte_is_checked() {
        let mut b = message(1).encode();
        b[0] = RECORD_FORMAT + 1;
        assert_eq!(
            StoredMessage::decode(&b),
            Err(DecodeError::NewerFormat(RECORD_FORMAT + 1))
        );
        b[0] = 0;
        assert!(StoredMessage::decode(&b).is_err());
    }

    #[test]
    fn invalid_fields_are_errors() {
        // QoS 3 in a queue entry (format byte, 8-byte id, then qos).
        let mut b = inflight().entry.encode();
        b[9] = 3;
        assert!(QueueEntry::decode(&b).is_err());
        // A huge sub id count must not allocate or panic.
        let mut b = inflight().entry.encode();
        b[11..15].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(QueueEntry::decode(&b), Err(DecodeError::Truncated));
        // A topic with U+0000 is not an MQTT string.
        let mut m = message(1).encode();
        m[13] = 0;
        assert!(StoredMessage::decode(&m).is_err());
    }

    #[test]
    fn message_conversion_keeps_deadlines() {
        let now = Instant::now();
        let now_ms = 1_000_000;
        let m = message(1);
        let live = m.to_message(now, now_ms);
        assert_eq!(live.topic, m.topic);
        // Stored deadline 1_700_000_000_000 is far in this clock's future.
        assert!(live.expires_at.is_some_and(|d| d > now));
        assert_eq!(StoredMessage::from_message(&live, now, now_ms), m);
        // Already expired: the deadline stays in the past, so a reader whose clock was read
        // a moment earlier also sees it expired.
        let old = StoredMessage {
            expires_at_ms: Some(now_ms - 500),
            ..m.clone()
        };
        let live = old.to_message(now, now_ms);
        let earlier = now.checked_sub(Duration::from_millis(10)).unwrap_or(now);
        assert!(live.expires_at.is_some_and(|d| d < now));
        assert!(live.is_expired(earlier) || earlier == now);
        assert!(live.is_expired(now));
        let never = StoredMessage {
            expires_at_ms: None,
            ..m
        };
        assert_eq!(never.to_message(now, now_ms).expires_at, None);
    }

    #[test]
    fn will_converts_both_ways() {
        let w = session().will.unwrap_or_else(|| unreachable!());
        let will: Will = w.to_will();
        assert_eq!(WillRecord::from(&will), w);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = any_decodes(&bytes);
        }

        #[test]
        fn flipped_bytes_never_panic(idx in 0usize..1000, byte in any::<u8>(), which in 0usize..8) {
            let (mut b, decodes) = all_encoded().swap_remove(which);
            let i = idx % b.len();
            b[i] = byte;
            let _ = decodes(&b);
            let _ = any_decodes(&b);
        }

        #[test]
        fn messages_round_trip(
            id in any::<u64>(),
            topic in "[a-z/+#]{0,20}",
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            qos in 0u8..3,
            retain in any::<bool>(),
            exp in proptest::option::of(any::<u64>()),
            origin in any::<u64>(),
            user in proptest::collection::vec(("[a-z]{0,5}", "\\PC{0,5}"), 0..4),
        ) {
            let m = StoredMessage {
                id,
                topic: MqttStr::from(topic),
                payload: Bytes::from(payload),
                qos: QoS::from_u8(qos).unwrap_or(QoS::AtMostOnce),
                retain,
                properties: PublishProperties {
                    user_properties: user
                        .into_iter()
                        .map(|(k, v)| (MqttStr::from(k), MqttStr::from(v)))
                        .collect(),
                    ..PublishProperties::default()
                },
                expires_at_ms: exp,
                origin,
            };
            prop_assert_eq!(StoredMessage::decode(&m.encode()), Ok(m));
        }
    }
}
