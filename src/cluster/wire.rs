//! A message as it crosses nodes: the storage record of `storage::record::StoredMessage`
//! as the body, and two headers a receiver reads without decoding the body.
//!
//! **Batches.** Several QoS 1/2 messages of one topic published here at about the same
//! time cross as one JetStream message (`forward.rs`): header [`COUNT`] says how many, and
//! the body is each record after its length (4 bytes, big-endian). One stream entry, one
//! replication and one delivery per node for all of them is what makes the cluster's
//! throughput; they share the topic, so a consumer filtered by topic (a shared group's, a
//! session's catch-up) still gets exactly what matches. Without the header the body is one
//! record, as before batches.
//!
//! Why the storage record: it already holds everything a message carries (topic, payload,
//! QoS, RETAIN, every MQTT 5 property, the expiry as a wall-clock deadline) in a versioned
//! format every release keeps decoding. A cluster in a rolling upgrade therefore has the
//! same compatibility rule as a data directory. The expiry is absolute Unix time, so it
//! assumes the nodes' clocks agree (NTP); a skew shortens or lengthens expiry by as much.

use crate::message::Message;
use crate::storage::record::{unix_now_ms, StoredMessage};
use async_nats::HeaderMap;
use bytes::Bytes;
use std::sync::Arc;

/// The node that published the message (its own messages are already routed there).
pub(crate) const ORIGIN: &str = "Tern-Node";

/// How many messages a batch holds (absent: one, the body is its record).
pub(crate) const COUNT: &str = "Tern-Count";

/// A QoS 1/2 batch's place among its sender's: `<node>.<boot>.<n>`, n counting from 1 in the
/// order the forwarder sent them, on the stream copy and on the fast copy (`fast.rs`).
pub(crate) const SEQ: &str = "Tern-Seq";

/// The sender (`<node>.<boot>`) and number of a batch, from its [`SEQ`] header.
pub(crate) fn seq_of(headers: Option<&HeaderMap>) -> Option<(&str, u64)> {
    let v = headers?.get(SEQ)?.as_str();
    let (sender, n) = v.rsplit_once('.')?;
    Some((sender, n.parse().ok()?))
}

/// The body of `msg`.
pub(crate) fn encode(msg: &Message) -> Bytes {
    Bytes::from(record(msg))
}

fn record(msg: &Message) -> Vec<u8> {
    StoredMessage::from_message(msg, crate::clock::now(), unix_now_ms()).encode()
}

/// The body of a batch of `msgs` (more than one): each record after its length.
pub(crate) fn encode_batch(msgs: &[&Message]) -> Bytes {
    let mut body = Vec::new();
    for m in msgs {
        let r = record(m);
        body.extend_from_slice(&(r.len() as u32).to_be_bytes());
        body.extend_from_slice(&r);
    }
    Bytes::from(body)
}

/// Headers naming this node as the origin of a batch of `count` messages.
pub(crate) fn batch_headers(node: &str, count: usize) -> HeaderMap {
    let mut h = headers(node);
    if count > 1 {
        h.insert(COUNT, count.to_string().as_str());
    }
    h
}

/// Every message of a body (one, or a batch per its headers), each with a new local id from
/// `next_id`; see [`decode`] for `own`. `None` when any record is unreadable (the whole
/// JetStream message is then dropped, counted by the caller: a batch is one unit).
pub(crate) fn decode_all(
    headers: Option<&HeaderMap>,
    body: &[u8],
    mut next_id: impl FnMut() -> u64,
    own: bool,
) -> Option<Vec<Arc<Message>>> {
    let count = match headers.and_then(|h| h.get(COUNT)) {
        None => return decode(body, next_id(), own).map(|m| vec![m]),
        Some(v) => v.as_str().parse::<usize>().ok()?,
    };
    // A count the body cannot hold is a broken batch, not an allocation to make.
    let mut out = Vec::with_capacity(count.min(body.len() / 4));
    let mut rest = body;
    for _ in 0..count {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return None;
        }
        let (rec, tail) = tail.split_at(len);
        out.push(decode(rec, next_id(), own)?);
        rest = tail;
    }
    rest.is_empty().then_some(out)
}

/// Headers naming this node as the origin.
pub(crate) fn headers(node: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ORIGIN, node);
    h
}

/// Whether a message carries `node` as its origin.
pub(crate) fn from_node(headers: Option<&HeaderMap>, node: &str) -> bool {
    headers
        .and_then(|h| h.get(ORIGIN))
        .is_some_and(|v| v.as_str() == node)
}

/// The broker's message from a body, with a new local id. `own`: this node published it,
/// and its origin session is one of ours (No Local applies when it comes back through the
/// stream); otherwise session ids are another node's and mean nothing here.
pub(crate) fn decode(body: &[u8], id: u64, own: bool) -> Option<Arc<Message>> {
    let stored = StoredMessage::decode(body).ok()?;
    let now = crate::clock::now();
    let mut msg = stored.to_message(now, unix_now_ms());
    msg.id = id;
    // Received here: the latency of its deliveries on this node counts from now.
    msg.received = Some(now);
    if !own {
        msg.origin = 0;
    }
    Some(Arc::new(msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MqttStr, PublishProperties, QoS};

    #[test]
    fn a_batch_number_names_its_sender() {
        let mut h = HeaderMap::new();
        h.insert(SEQ, "node.with.dots.1796.42");
        assert_eq!(seq_of(Some(&h)), Some(("node.with.dots.1796", 42)));
        h.insert(SEQ, "t1.7.x");
        assert_eq!(seq_of(Some(&h)), None, "not a number");
        assert_eq!(seq_of(None), None);
    }

    #[test]
    fn a_message_crosses_with_everything_it_carries() {
        let msg = Message {
            id: 7,
            topic: MqttStr::from("a/b"),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: PublishProperties {
                content_type: Some(MqttStr::from("text/plain")),
                response_topic: Some(MqttStr::from("r/1")),
                correlation_data: Some(Bytes::from_static(b"\x00\x01")),
                user_properties: vec![(MqttStr::from("k"), MqttStr::from("v"))],
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(30),
                ..Default::default()
            },
            expires_at: Some(crate::clock::now() + std::time::Duration::from_secs(30)),
            origin: 99,
            received: None,
        };
        let body = encode(&msg);
        let got = decode(&body, 1234, false).unwrap();
        assert_eq!(
            decode(&body, 1, true).unwrap().origin,
            99,
            "own: No Local still applies"
        );
        assert_eq!(got.id, 1234);
        assert_eq!(got.origin, 0);
        assert_eq!(got.topic.as_str(), "a/b");
        assert_eq!(&got.payload[..], b"hello");
        assert_eq!(got.qos, QoS::ExactlyOnce);
        assert!(got.retain);
        assert_eq!(got.properties, msg.properties);
        let left = got.remaining_expiry(crate::clock::now()).unwrap().unwrap();
        assert!((29..=30).contains(&left), "{left}");
        assert!(decode(b"\xffnot a record", 1, false).is_none());
    }

    #[test]
    fn a_batch_crosses_whole_and_in_order() {
        let msgs: Vec<Message> = (0..3u8)
            .map(|i| Message {
                id: u64::from(i),
                topic: MqttStr::from("a/b"),
                payload: Bytes::from(vec![i; usize::from(i) * 10]),
                qos: QoS::AtLeastOnce,
                retain: i == 1,
                properties: PublishProperties::default(),
                expires_at: None,
                origin: 5,
                received: None,
            })
            .collect();
        let refs: Vec<&Message> = msgs.iter().collect();
        let body = encode_batch(&refs);
        let h = batch_headers("t1", 3);
        let mut next = 100;
        let got = decode_all(
            Some(&h),
            &body,
            || {
                next += 1;
                next
            },
            true,
        )
        .unwrap();
        assert_eq!(got.len(), 3);
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m.id, 101 + i as u64);
            assert_eq!(m.payload.len(), i * 10);
            assert_eq!(m.retain, i == 1);
            assert_eq!(m.origin, 5, "own: No Local still applies");
        }
        // One message without the header is the plain record.
        let one = decode_all(Some(&headers("t1")), &encode(&msgs[2]), || 1, false).unwrap();
        assert_eq!((one.len(), one[0].payload.len(), one[0].origin), (1, 20, 0));
        assert_eq!(
            batch_headers("t1", 1).get(COUNT),
            None,
            "one message is no batch"
        );
        // Truncated, padded, over-counted or under-counted: the whole batch is refused.
        assert!(decode_all(Some(&h), &body[..body.len() - 1], || 1, false).is_none());
        let mut padded = body.to_vec();
        padded.push(0);
        assert!(decode_all(Some(&h), &padded, || 1, false).is_none());
        assert!(decode_all(Some(&batch_headers("t1", 4)), &body, || 1, false).is_none());
        assert!(decode_all(Some(&batch_headers("t1", 2)), &body, || 1, false).is_none());
        let mut huge = HeaderMap::new();
        huge.insert(COUNT, "18446744073709551615");
        assert!(decode_all(Some(&huge), &body, || 1, false).is_none());
    }

    #[test]
    fn the_origin_header_names_the_node() {
        let h = headers("t1");
        assert!(from_node(Some(&h), "t1"));
        assert!(!from_node(Some(&h), "t2"));
        assert!(!from_node(None, "t1"));
    }
}
