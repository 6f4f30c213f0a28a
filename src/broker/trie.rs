//! The subscription index: topic filters in a tree of levels, matched against a topic name.
//!
//! A node holds the subscriptions whose filter ends there, the `#` subscriptions of the level
//! below it, one `+` child and the literal children. Matching walks the topic once, branching
//! only into `+`; a topic starting with `$` skips wildcards at the first level
//! ([MQTT-4.7.2-1]). Entries are keyed by session so a re-subscribe replaces
//! ([MQTT-3.8.4-3]) and an unsubscribe removes exactly one entry.

use std::collections::HashMap;

pub struct Trie<V> {
    root: Node<V>,
    len: usize,
}

struct Node<V> {
    children: HashMap<Box<str>, Node<V>>,
    plus: Option<Box<Node<V>>>,
    /// Subscriptions whose filter is `<path to here>/#`.
    hash: Vec<(u64, V)>,
    /// Subscriptions whose filter ends exactly here.
    here: Vec<(u64, V)>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            hash: Vec::new(),
            here: Vec::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_empty()
            && self.here.is_empty()
    }
}

fn split(s: &str) -> (&str, Option<&str>) {
    match s.split_once('/') {
        Some((level, rest)) => (level, Some(rest)),
        None => (s, None),
    }
}

fn upsert<V>(list: &mut Vec<(u64, V)>, key: u64, value: V) -> bool {
    if let Some(slot) = list.iter_mut().find(|(k, _)| *k == key) {
        slot.1 = value;
        true
    } else {
        list.push((key, value));
        false
    }
}

fn remove<V>(list: &mut Vec<(u64, V)>, key: u64) -> bool {
    match list.iter().position(|(k, _)| *k == key) {
        Some(i) => {
            list.swap_remove(i);
            true
        }
        None => false,
    }
}

impl<V> Default for Trie<V> {
    fn default() -> Self {
        Trie {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V: Clone> Trie<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of (filter, session) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `key`'s subscription to a valid `filter`. Returns true when it replaced one.
    pub fn subscribe(&mut self, filter: &str, key: u64, value: V) -> bool {
        let mut node = &mut self.root;
        let mut rest = Some(filter);
        while let Some(s) = rest {
            let (level, next) = split(s);
            if level == "#" {
                let replaced = upsert(&mut node.hash, key, value);
                self.len += usize::from(!replaced);
                return replaced;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
            rest = next;
        }
        let replaced = upsert(&mut node.here, key, value);
        self.len += usize::from(!replaced);
        replaced
    }

    /// Removes `key`'s subscription to `filter`; true if there was one.
    pub fn unsubscribe(&mut self, filter: &str, key: u64) -> bool {
        let removed = Self::remove_in(&mut self.root, Some(filter), key);
        self.len -= usize::from(removed);
        removed
    }

    fn remove_in(node: &mut Node<V>, rest: Option<&str>, key: u64) -> bool {
        let Some(s) = rest else {
            return remove(&mut node.here, key);
        };
        let (level, next) = split(s);
        if level == "#" {
            return remove(&mut node.hash, key);
        }
        if level == "+" {
            let Some(child) = node.plus.as_deref_mut() else {
                return false;
            };
            let removed = Self::remove_in(child, next, key);
            if child.is_empty() {
                node.plus = None;
            }
            removed
        } else {
            let Some(child) = node.children.get_mut(level) else {
                return false;
            };
            let removed = Self::remove_in(child, next, key);
            if child.is_empty() {
                node.children.remove(level);
            }
            removed
        }
    }

    /// Appends every subscription matching `topic` to `out` (one entry per matching filter;
    /// the caller merges overlapping subscriptions of one session). Returns how many distinct
    /// filters contributed: with at most one, `out` cannot hold a session twice and the
    /// caller can skip merging.
    pub fn match_into(&self, topic: &str, out: &mut Vec<V>) -> usize {
        let dollar = topic.starts_with('$');
        Self::walk(&self.root, Some(topic), dollar, out)
    }

    fn take(list: &[(u64, V)], out: &mut Vec<V>) -> usize {
        out.extend(list.iter().map(|(_, v)| v.clone()));
        usize::from(!list.is_empty())
    }

    fn walk(node: &Node<V>, rest: Option<&str>, skip_wildcards: bool, out: &mut Vec<V>) -> usize {
        let mut lists = 0;
        if !skip_wildcards {
            // `#` also matches the parent level itself: "a/#" matches "a" ([MQTT-4.7.1-2]).
            lists += Self::take(&node.hash, out);
        }
        let Some(s) = rest else {
            return lists + Self::take(&node.here, out);
        };
        let (level, next) = split(s);
        if let Some(child) = node.children.get(level) {
            lists += Self::walk(child, next, false, out);
        }
        if !skip_wildcards {
            if let Some(plus) = node.plus.as_deref() {
                lists += Self::walk(plus, next, false, out);
            }
        }
        lists
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::validate::topic_matches;
    use proptest::prelude::*;

    fn matches(t: &Trie<u32>, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        t.match_into(topic, &mut out);
        out.sort();
        out
    }

    #[test]
    fn spec_examples() {
        let mut t = Trie::new();
        t.subscribe("sport/tennis/player1/#", 1, 1);
        t.subscribe("sport/#", 2, 2);
        t.subscribe("sport/tennis/+", 3, 3);
        t.subscribe("+", 4, 4);
        t.subscribe("+/+", 5, 5);
        t.subscribe("/+", 6, 6);
        t.subscribe("#", 7, 7);
        t.subscribe("$SYS/#", 8, 8);
        t.subscribe("+/monitor/Clients", 9, 9);
        t.subscribe("$SYS/monitor/+", 10, 10);
        // [MQTT-4.7.1-2] "sport/tennis/player1/#" matches the parent level.
        assert_eq!(matches(&t, "sport/tennis/player1"), vec![1, 2, 3, 7]);
        assert_eq!(matches(&t, "sport/tennis/player1/ranking"), vec![1, 2, 7]);
        assert_eq!(matches(&t, "sport"), vec![2, 4, 7]);
        assert_eq!(matches(&t, "sport/"), vec![2, 5, 7]);
        assert_eq!(matches(&t, "/finance"), vec![5, 6, 7]);
        // [MQTT-4.7.2-1] wildcards at the first level do not match '$' topics.
        assert_eq!(matches(&t, "$SYS/monitor/Clients"), vec![8, 10]);
        assert_eq!(matches(&t, "$SYS"), vec![8]);
        // Empty levels are levels.
        assert_eq!(matches(&t, "a//b"), vec![7]);
    }

    #[test]
    fn replace_and_remove() {
        let mut t = Trie::new();
        assert!(!t.subscribe("a/+", 1, 10));
        assert!(t.subscribe("a/+", 1, 11));
        assert_eq!(t.len(), 1);
        assert_eq!(matches(&t, "a/b"), vec![11]);
        assert!(!t.unsubscribe("a/b", 1));
        assert!(t.unsubscribe("a/+", 1));
        assert!(t.is_empty());
        assert!(t.root.is_empty(), "empty nodes are pruned");
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("".to_string()),
            Just("$x".to_string())
        ]
    }

    fn topic() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..5).prop_map(|l| l.join("/"))
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            proptest::collection::vec(prop_oneof![level(), Just("+".to_string())], 0..4),
            any::<bool>(),
        )
            .prop_filter_map("filter must be non-empty", |(mut l, hash)| {
                if hash {
                    l.push("#".to_string());
                }
                if l.is_empty() {
                    None
                } else {
                    Some(l.join("/"))
                }
            })
    }

    proptest! {
        #[test]
        fn trie_agrees_with_naive_matcher(
            filters in proptest::collection::vec(filter(), 1..12),
            topics in proptest::collection::vec(topic(), 1..12),
        ) {
            let mut t = Trie::new();
            for (i, f) in filters.iter().enumerate() {
                t.subscribe(f, i as u64, i as u32);
            }
            for topic in &topics {
                let mut expected: Vec<u32> = filters
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| topic_matches(f, topic))
                    .map(|(i, _)| i as u32)
                    .collect();
                expected.sort();
                prop_assert_eq!(matches(&t, topic), expected, "topic {}", topic);
            }
            for (i, f) in filters.iter().enumerate() {
                t.unsubscribe(f, i as u64);
            }
            prop_assert!(t.is_empty());
            prop_assert!(t.root.is_empty());
        }
    }
}
