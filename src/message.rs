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
}
