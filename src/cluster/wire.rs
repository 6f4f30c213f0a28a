//! A message as it crosses nodes: the storage record of `storage::record::StoredMessage`
//! as the body, and two headers a receiver reads without decoding the body.
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

/// The body of `msg`.
pub(crate) fn encode(msg: &Message) -> Bytes {
    Bytes::from(StoredMessage::from_message(msg, crate::clock::now(), unix_now_ms()).encode())
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
    let mut msg = stored.to_message(crate::clock::now(), unix_now_ms());
    msg.id = id;
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
    fn the_origin_header_names_the_node() {
        let h = headers("t1");
        assert!(from_node(Some(&h), "t1"));
        assert!(!from_node(Some(&h), "t2"));
        assert!(!from_node(None, "t1"));
    }
}
