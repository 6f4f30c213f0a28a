//! Retained messages in a tree of topic levels, looked up by a subscription's filter.

use crate::message::Message;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Default)]
pub struct RetainTree {
    root: Node,
    len: usize,
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.message.is_none()
    }

    fn collect_all(&self, out: &mut Vec<Arc<Message>>) {
        if let Some(m) = &self.message {
            out.push(m.clone());
        }
        for child in self.children.values() {
            child.collect_all(out);
        }
    }
}

/// Outcome of storing a retained message.
#[derive(Debug, PartialEq, Eq)]
pub enum RetainOutcome {
    Stored,
    Replaced,
    Deleted,
    /// `limits.max_retained_messages` reached: a new topic is not retained.
    Full,
}

impl RetainTree {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `msg` as the retained message of its topic; an empty payload deletes it
    /// ([MQTT-3.3.1-6] [MQTT-3.3.1-7]).
    pub fn store(&mut self, msg: Arc<Message>, max: usize) -> RetainOutcome {
        let topic = msg.topic.as_str().to_string();
        if msg.payload.is_empty() {
            self.remove(&topic);
            return RetainOutcome::Deleted;
        }
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.message.is_some() {
            node.message = Some(msg);
            return RetainOutcome::Replaced;
        }
        if self.len >= max {
            // Undo the path we may just have created.
            self.remove(&topic);
            return RetainOutcome::Full;
        }
        node.message = Some(msg);
        self.len += 1;
        RetainOutcome::Stored
    }

    fn remove(&mut self, topic: &str) -> bool {
        fn go(node: &mut Node, mut levels: std::str::Split<'_, char>) -> bool {
            match levels.next() {
                None => node.message.take().is_some(),
                Some(level) => {
                    let Some(child) = node.children.get_mut(level) else {
                        return false;
                    };
                    let removed = go(child, levels);
                    if child.is_empty() {
                        node.children.remove(level);
                    }
                    removed
                }
            }
        }
        let removed = go(&mut self.root, topic.split('/'));
        self.len -= usize::from(removed);
        removed
    }

    /// Every retained message whose topic matches `filter`, dropping expired ones on the way.
    pub fn matching(&self, filter: &str, out: &mut Vec<Arc<Message>>) {
        let levels: Vec<&str> = filter.split('/').collect();
        Self::walk(&self.root, &levels, true, out);
    }

    fn walk(node: &Node, levels: &[&str], first: bool, out: &mut Vec<Arc<Message>>) {
        let Some((&level, rest)) = levels.split_first() else {
            if let Some(m) = &node.message {
                out.push(m.clone());
            }
            return;
        };
        // [MQTT-4.7.2-1] wildcards at the first level skip topics starting with '$'.
        let visible = |name: &str| !(first && name.starts_with('$'));
        match level {
            "#" => {
                // "a/#" matches "a" itself and everything below.
                if !first {
                    if let Some(m) = &node.message {
                        out.push(m.clone());
                    }
                }
                for (name, child) in &node.children {
                    if visible(name) {
                        child.collect_all(out);
                    }
                }
            }
            "+" => {
                for (name, child) in &node.children {
                    if visible(name) {
                        Self::walk(child, rest, false, out);
                    }
                }
            }
            literal => {
                if let Some(child) = node.children.get(literal) {
                    Self::walk(child, rest, false, out);
                }
            }
        }
    }

    /// Drops retained messages whose expiry has passed ([MQTT-3.3.2-5]); returns how many.
    pub fn purge_expired(&mut self, now: std::time::Instant) -> usize {
        fn go(node: &mut Node, now: std::time::Instant) -> usize {
            let mut n = 0;
            if node.message.as_ref().is_some_and(|m| m.is_expired(now)) {
                node.message = None;
                n += 1;
            }
            node.children.retain(|_, child| {
                n += go(child, now);
                !child.is_empty()
            });
            n
        }
        let n = go(&mut self.root, now);
        self.len -= n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::validate::topic_matches;
    use crate::protocol::{MqttStr, PublishProperties, QoS};
    use bytes::Bytes;

    fn msg(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            id: 0,
            topic: MqttStr::from(topic),
            payload: Bytes::from_static(payload),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: PublishProperties::default(),
            expires_at: None,
            origin: 0,
            received: None,
        })
    }

    fn topics(t: &RetainTree, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        t.matching(filter, &mut out);
        let mut v: Vec<String> = out.iter().map(|m| m.topic.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn store_replace_delete() {
        let mut t = RetainTree::default();
        assert_eq!(t.store(msg("a/b", b"1"), 10), RetainOutcome::Stored);
        assert_eq!(t.store(msg("a/b", b"2"), 10), RetainOutcome::Replaced);
        assert_eq!(t.len(), 1);
        let mut out = Vec::new();
        t.matching("a/b", &mut out);
        assert_eq!(&out[0].payload[..], b"2");
        assert_eq!(t.store(msg("a/b", b""), 10), RetainOutcome::Deleted);
        assert!(t.is_empty());
        assert!(t.root.is_empty());
    }

    #[test]
    fn limit_refuses_new_topics_only() {
        let mut t = RetainTree::default();
        assert_eq!(t.store(msg("a", b"1"), 1), RetainOutcome::Stored);
        assert_eq!(t.store(msg("b/c", b"1"), 1), RetainOutcome::Full);
        assert!(!t.root.children.contains_key("b"));
        assert_eq!(t.store(msg("a", b"2"), 1), RetainOutcome::Replaced);
    }

    #[test]
    fn filters_agree_with_naive_matcher() {
        let all = ["a", "a/b", "a/b/c", "a//c", "b", "$SYS/x", "$SYS", "/a"];
        let mut t = RetainTree::default();
        for topic in all {
            t.store(msg(topic, b"x"), 100);
        }
        for filter in [
            "#", "+", "a/#", "a/+", "+/b", "+/+/c", "$SYS/#", "$SYS/+", "/+", "+/#", "a/b/#",
        ] {
            let mut expected: Vec<String> = all
                .iter()
                .filter(|topic| topic_matches(filter, topic))
                .map(|s| s.to_string())
                .collect();
            expected.sort();
            assert_eq!(topics(&t, filter), expected, "filter {filter}");
        }
    }
}
