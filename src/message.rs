//! An application message as the broker holds it: shared by every subscriber through an `Arc`,
//! payload and strings as `Bytes` slices of one owned copy, never copied per subscriber.

use crate::protocol::{MqttStr, PublishProperties, QoS};
use bytes::Bytes;
use std::time::{Duration, Instant};

/// The message's expiry has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired;

#[derive(Debug)]
pub struct Message {
    /// Broker-wide sequence number, for ordering and storage.
    pub id: u64,
    pub topic: MqttStr,
    pub payload: Bytes,
    /// QoS the publisher used (delivery QoS is the minimum of this and the subscription's).
    pub qos: QoS,
    /// The RETAIN flag as published.
    pub retain: bool,
    /// v5 properties passed through untouched (Message Expiry is rewritten on delivery).
    pub properties: PublishProperties,
    /// Absolute deadline from the Message Expiry Interval: broker time counts, queueing included.
    pub expires_at: Option<Instant>,
    /// The publishing session, for No Local; 0 for the broker's own messages.
    pub origin: u64,
    /// When this broker took the message in (the driver's clock), for the publish-to-acknowledge
    /// latency of its deliveries (consumer lag). None when unknown: a message read back from
    /// the store keeps no receive instant (an `Instant` means nothing after a restart); the
    /// loader may derive one from its queue entry's enqueue second
    /// ([`Message::received_from_unix`]).
    pub received: Option<Instant>,
}

impl Message {
    /// Remaining Message Expiry Interval in whole seconds, or None when the message never
    /// expires; `Err(Expired)` when it has expired ([MQTT-3.3.2-5]).
    pub fn remaining_expiry(&self, now: Instant) -> Result<Option<u32>, Expired> {
        match self.expires_at {
            None => Ok(None),
            Some(deadline) if deadline <= now => Err(Expired),
            Some(deadline) => {
                let left = deadline - now;
                // Round up so a message is never forwarded with 0 (which would mean "no expiry"
                // to nobody but look expired to some clients) while time is left.
                let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                Ok(Some(secs.min(u64::from(u32::MAX)) as u32))
            }
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|d| d <= now)
    }

    /// Bytes this message accounts for in queue limits.
    pub fn weight(&self) -> usize {
        self.payload.len() + self.topic.len()
    }

    pub fn deadline_from(interval: Option<u32>, now: Instant) -> Option<Instant> {
        interval.map(|s| now + Duration::from_secs(u64::from(s)))
    }

    /// The receive instant of a message loaded from the store, from the Unix second its queue
    /// entry was enqueued (0: unknown, None). Whole seconds: the latency of a message that
    /// waited on disk is counted from its stored time, the downtime of a restart included
    /// (what its consumer saw), never made up.
    pub fn received_from_unix(enqueued: u32, now: Instant, now_unix_ms: u64) -> Option<Instant> {
        if enqueued == 0 {
            return None;
        }
        let ago = now_unix_ms.saturating_sub(u64::from(enqueued) * 1000);
        Some(now.checked_sub(Duration::from_millis(ago)).unwrap_or(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(expires_at: Option<Instant>) -> Message {
        Message {
            id: 1,
            topic: MqttStr::from("t"),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: PublishProperties::default(),
            expires_at,
            origin: 0,
            received: None,
        }
    }

    #[test]
    fn remaining_expiry_counts_down_and_expires() {
        let now = Instant::now();
        assert_eq!(msg(None).remaining_expiry(now), Ok(None));
        let m = msg(Some(now + Duration::from_millis(2500)));
        assert_eq!(m.remaining_expiry(now), Ok(Some(3)));
        assert_eq!(
            m.remaining_expiry(now + Duration::from_secs(2)),
            Ok(Some(1))
        );
        assert!(m.remaining_expiry(now + Duration::from_secs(3)).is_err());
        assert!(m.is_expired(now + Duration::from_secs(3)));
    }

    #[test]
    fn a_stored_enqueue_second_gives_a_receive_instant() {
        let now = Instant::now() + Duration::from_secs(3600);
        assert_eq!(Message::received_from_unix(0, now, 5_000_000), None);
        let at = Message::received_from_unix(4_990, now, 5_000_000).expect("known");
        assert_eq!(now - at, Duration::from_secs(10));
        // A clock that went back: not in the future.
        assert_eq!(
            Message::received_from_unix(6_000, now, 5_000_000),
            Some(now)
        );
    }
}
