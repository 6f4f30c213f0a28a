//! Retained messages in a tree of topic levels, looked up by a subscription's filter.

use crate::message::Message;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

/// A retained message ordered by its topic alone (topics are unique in the tree).
struct ByTopic(Arc<Message>);

impl PartialEq for ByTopic {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for ByTopic {}

impl PartialOrd for ByTopic {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByTopic {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.topic.as_str().cmp(other.0.topic.as_str())
    }
}

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

    fn visit_all(&self, visit: &mut dyn FnMut(&Arc<Message>)) {
        if let Some(m) = &self.message {
            visit(m);
        }
        for child in self.children.values() {
            child.visit_all(visit);
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
        self.for_each_matching(filter, &mut |m| out.push(m.clone()));
    }

    /// Calls `visit` with every retained message whose topic matches `filter`, in no order,
    /// expired ones included.
    fn for_each_matching(&self, filter: &str, visit: &mut dyn FnMut(&Arc<Message>)) {
        let levels: Vec<&str> = filter.split('/').collect();
        Self::walk(&self.root, &levels, true, visit);
    }

    /// One page of the unexpired messages matching `filter`, in topic order: the first
    /// `limit` whose topic sorts after `after`, and whether more follow. It holds at most
    /// `limit + 1` of them at a time (a max-heap of the smallest topics seen), however many
    /// match, so a listing of millions pages without copying and sorting them all per page.
    pub fn page(
        &self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
        now: std::time::Instant,
    ) -> (Vec<Arc<Message>>, bool) {
        let keep = limit.saturating_add(1);
        let mut smallest: BinaryHeap<ByTopic> = BinaryHeap::with_capacity(keep.min(1024));
        self.for_each_matching(filter, &mut |m| {
            let topic = m.topic.as_str();
            if m.is_expired(now) || after.is_some_and(|a| topic <= a) {
                return;
            }
            if smallest.len() < keep {
                smallest.push(ByTopic(m.clone()));
            } else if smallest
                .peek()
                .is_some_and(|largest| topic < largest.0.topic.as_str())
            {
                smallest.pop();
                smallest.push(ByTopic(m.clone()));
            }
        });
        let mut page: Vec<Arc<Message>> = smallest
            .into_sorted_vec()
            .into_iter()
            .map(|b| b.0)
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        (page, more)
    }

    fn walk(node: &Node, levels: &[&str], first: bool, visit: &mut dyn FnMut(&Arc<Message>)) {
        let Some((&level, rest)) = levels.split_first() else {
            if let Some(m) = &node.message {
                visit(m);
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
                        visit(m);
                    }
                }
                for (name, child) in &node.children {
                    if visible(name) {
                        child.visit_all(visit);
                    }
                }
            }
            "+" => {
                for (name, child) in &node.children {
                    if visible(name) {
                        Self::walk(child, rest, false, visit);
                    }
                }
            }
            literal => {
                if let Some(child) = node.children.get(literal) {
                    Self::walk(child, rest, false, visit);
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
        Arc::new(message(topic, payload, None))
    }

    fn message(
        topic: &str,
        payload: &'static [u8],
        expires_at: Option<std::time::Instant>,
    ) -> Message {
        Message {
            id: 0,
            topic: MqttStr::from(topic),
            payload: Bytes::from_static(payload),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: PublishProperties::default(),
            expires_at,
            origin: 0,
            received: None,
        }
    }

    fn topics(t: &RetainTree, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        t.matching(filter, &mut out);
        let mut v: Vec<String> = out.iter().map(|m| m.topic.to_string()).collect();
        v.sort();
        v
    }

    /// Pages walked from the start with each page's last topic as the next `after` give every
    /// matching topic once, in order, for page sizes around the number of matches; expired
    /// ones are left out.
    #[test]
    fn pages_walk_the_matches_in_topic_order() {
        let mut t = RetainTree::default();
        let mut want = Vec::new();
        for i in 0..57 {
            let topic = format!("s/{}/t{}", i % 7, (i * 37) % 101);
            t.store(msg(&topic, b"x"), 1000);
            want.push(topic);
        }
        t.store(msg("other/x", b"x"), 1000);
        let now = std::time::Instant::now();
        let gone = message(
            "s/9/expired",
            b"x",
            Some(now - std::time::Duration::from_secs(1)),
        );
        t.store(Arc::new(gone), 1000);
        want.sort();
        want.dedup();
        for limit in [1, 2, 5, 56, 57, 58, 500] {
            let mut seen = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let (page, more) = t.page("s/#", after.as_deref(), limit, now);
                assert!(page.len() <= limit);
                seen.extend(page.iter().map(|m| m.topic.to_string()));
                if !more {
                    break;
                }
                after = page.last().map(|m| m.topic.to_string());
                assert!(seen.len() <= want.len(), "limit {limit}: runs past the end");
            }
            assert_eq!(seen, want, "limit {limit}");
        }
        // A `+` filter, from the middle: the two topics of s/3/ that follow s/3/t3.
        let under: Vec<&String> = want
            .iter()
            .filter(|w| w.starts_with("s/3/") && w.as_str() > "s/3/t3")
            .collect();
        assert!(under.len() > 2, "{under:?}");
        let (page, more) = t.page("s/3/+", Some("s/3/t3"), 2, now);
        let names: Vec<&str> = page.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(names, [under[0].as_str(), under[1].as_str()]);
        assert!(more);
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
