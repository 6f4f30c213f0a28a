//! A bridge's rules, free of I/O: which `out` rule a local message takes and the topic it
//! gets at the remote, which `in` rule a remote message came through and its local topic, and
//! the echo filter that keeps a 3.1.1 remote's copies of our own messages out.
//!
//! Topics are mapped by swapping prefixes: `out` turns `local_prefix + rest` into
//! `remote_prefix + rest`, `in` the reverse (a topic without the expected prefix keeps its
//! whole self as `rest`). The first matching rule wins, as in Mosquitto's bridge.
//!
//! Echoes: MQTT 5 lets the bridge subscribe with No Local, so a remote never sends our own
//! messages back. MQTT 3.1.1 has no such option: a remote sends back every message we
//! published that one of our `in` subscriptions matches. The bridge knows which of its
//! messages those are (an `in` filter matches the remote topic it sends to), remembers a hash
//! of each (topic and payload) for a while, and drops the first incoming copy of it.

use crate::config::BridgeRule;
use crate::protocol::validate::{is_valid_topic_name, topic_matches};
use crate::protocol::QoS;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

/// Where a message goes: its topic on the other side and the highest QoS used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub topic: String,
    pub qos: QoS,
}

fn swap(topic: &str, from: &str, to: &str) -> String {
    let rest = topic.strip_prefix(from).unwrap_or(topic);
    format!("{to}{rest}")
}

fn qos(rule: &BridgeRule) -> QoS {
    QoS::from_u8(rule.qos).unwrap_or(QoS::AtLeastOnce)
}

/// The remote topic of local message `topic` by the first `out` rule whose filter matches
/// it; None when none does (or the result is not a valid topic name).
pub fn outbound(rules: &[BridgeRule], topic: &str) -> Option<Mapped> {
    let rule = rules.iter().find(|r| topic_matches(&r.filter, topic))?;
    let mapped = swap(topic, &rule.local_prefix, &rule.remote_prefix);
    is_valid_topic_name(&mapped).then(|| Mapped {
        topic: mapped,
        qos: qos(rule),
    })
}

/// The local topic of remote message `topic` by the first `in` rule whose (remote) filter
/// matches it.
pub fn inbound(rules: &[BridgeRule], topic: &str) -> Option<Mapped> {
    let rule = rules.iter().find(|r| topic_matches(&r.filter, topic))?;
    let mapped = swap(topic, &rule.remote_prefix, &rule.local_prefix);
    (is_valid_topic_name(&mapped) && !mapped.starts_with('$')).then(|| Mapped {
        topic: mapped,
        qos: qos(rule),
    })
}

/// Whether a message sent to the remote as `remote_topic` comes back through an `in` rule.
pub fn echoes(rules: &[BridgeRule], remote_topic: &str) -> bool {
    rules.iter().any(|r| topic_matches(&r.filter, remote_topic))
}

/// How long a sent message's echo is waited for.
const ECHO_WAIT: Duration = Duration::from_secs(60);
/// Most sent messages remembered; beyond it the oldest are forgotten (their echoes, should
/// they still come, pass as messages).
const ECHO_MAX: usize = 100_000;

/// The messages sent whose echo may still come: a multiset of (topic, payload) hashes, and
/// their order, to forget the oldest.
#[derive(Default)]
pub struct Echoes {
    counts: HashMap<u64, u32>,
    order: VecDeque<(Instant, u64)>,
}

fn hash(topic: &str, payload: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    topic.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

impl Echoes {
    /// A message was sent to the remote that will come back.
    pub fn sent(&mut self, topic: &str, payload: &[u8], now: Instant) {
        self.forget(now);
        if self.order.len() >= ECHO_MAX {
            self.pop();
        }
        let h = hash(topic, payload);
        *self.counts.entry(h).or_insert(0) += 1;
        self.order.push_back((now, h));
    }

    /// A message came from the remote: true when it is the echo of one sent (and consumed).
    pub fn is_echo(&mut self, topic: &str, payload: &[u8], now: Instant) -> bool {
        self.forget(now);
        let h = hash(topic, payload);
        match self.counts.get_mut(&h) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                self.counts.remove(&h);
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.counts.values().map(|n| *n as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    fn forget(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= ECHO_WAIT)
        {
            self.pop();
        }
    }

    /// Forgets the oldest entry (if its echo already came, the count is gone: nothing to do).
    fn pop(&mut self) {
        let Some((_, h)) = self.order.pop_front() else {
            return;
        };
        if let Some(n) = self.counts.get_mut(&h) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(filter: &str, qos: u8, local: &str, remote: &str) -> BridgeRule {
        BridgeRule {
            filter: filter.into(),
            qos,
            local_prefix: local.into(),
            remote_prefix: remote.into(),
        }
    }

    #[test]
    fn out_rules_add_the_remote_prefix_in_rules_swap_back() {
        let out = [rule("sensors/#", 1, "", "site17/")];
        assert_eq!(
            outbound(&out, "sensors/t1"),
            Some(Mapped {
                topic: "site17/sensors/t1".into(),
                qos: QoS::AtLeastOnce
            })
        );
        assert_eq!(outbound(&out, "other/t1"), None);
        let inn = [rule("cmd/site17/#", 2, "cmd/", "cmd/site17/")];
        assert_eq!(
            inbound(&inn, "cmd/site17/reboot"),
            Some(Mapped {
                topic: "cmd/reboot".into(),
                qos: QoS::ExactlyOnce
            })
        );
        // The remote prefix is the whole topic: nothing left but the local prefix.
        let bare = [rule("x", 1, "", "x")];
        assert_eq!(inbound(&bare, "x"), None, "an empty topic is no topic");
        // First matching rule wins.
        let two = [rule("a/#", 0, "", "one/"), rule("a/b", 1, "", "two/")];
        assert_eq!(
            outbound(&two, "a/b").map(|m| m.topic),
            Some("one/a/b".into())
        );
    }

    #[test]
    fn a_message_is_an_echo_once_per_send_and_only_for_a_while() {
        let mut e = Echoes::default();
        let t0 = Instant::now();
        e.sent("site/a", b"1", t0);
        e.sent("site/a", b"1", t0);
        assert!(e.is_echo("site/a", b"1", t0));
        assert!(!e.is_echo("site/a", b"2", t0), "another payload");
        assert!(e.is_echo("site/a", b"1", t0));
        assert!(
            !e.is_echo("site/a", b"1", t0),
            "both copies came back already"
        );
        e.sent("site/b", b"x", t0);
        assert!(
            !e.is_echo("site/b", b"x", t0 + ECHO_WAIT),
            "waited too long"
        );
        assert!(e.is_empty());
    }

    #[test]
    fn the_echo_filter_is_bounded() {
        let mut e = Echoes::default();
        let t0 = Instant::now();
        for i in 0..ECHO_MAX + 10 {
            e.sent("t", i.to_string().as_bytes(), t0);
        }
        assert_eq!(e.len(), ECHO_MAX);
        assert!(!e.is_echo("t", b"0", t0), "the oldest were forgotten");
        assert!(e.is_echo("t", (ECHO_MAX + 9).to_string().as_bytes(), t0));
    }

    #[test]
    fn echoes_are_expected_where_an_in_rule_matches_the_remote_topic() {
        let inn = [rule("site17/#", 1, "", "")];
        assert!(echoes(&inn, "site17/sensors/t"));
        assert!(!echoes(&inn, "site18/sensors/t"));
    }
}
