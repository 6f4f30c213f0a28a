//! Topic rules (section 4.7). Tern's own: the codec crate's matcher rejects `$SYS/#`.

/// A Topic Name: at least one character ([MQTT-4.7.3-1]) and no wildcards ([MQTT-3.3.2-2]).
pub fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#'])
}

/// A Topic Filter: at least one character ([MQTT-4.7.3-1]); `#` only as the whole last level
/// ([MQTT-4.7.1-2]); `+` only as a whole level ([MQTT-4.7.1-3]).
pub fn is_valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// Whether topic name `topic` matches topic filter `filter` (section 4.7.1): `+` one whole
/// level, `#` the parent level and everything below it ([MQTT-4.7.1-2]), and a filter
/// starting with a wildcard never matches a `$` topic ([MQTT-4.7.2-1]). For checks on one
/// message (a bridge's rules), and the reference the subscription trie, the retained tree, the
/// ACL and the cluster's subjects are checked against by property tests.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match (f, t.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(level)) if f == level => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// `$share/{ShareName}/{filter}`: returns (share name, filter) when `filter` names a shared
/// subscription, whether or not it is well formed (the caller refuses malformed ones).
pub fn shared_subscription(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    Some(rest.split_once('/').unwrap_or((rest, "")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(is_valid_topic_name("a/b"));
        assert!(is_valid_topic_name("/"));
        assert!(is_valid_topic_name("$SYS/x"));
        assert!(!is_valid_topic_name("")); // [MQTT-4.7.3-1]
        assert!(!is_valid_topic_name("a/+")); // [MQTT-3.3.2-2]
        assert!(!is_valid_topic_name("a/#"));
    }

    #[test]
    fn topic_filters_spec_examples() {
        for ok in [
            "#",
            "+",
            "sport/#",
            "sport/tennis/#",
            "+/tennis/#",
            "sport/+/player1",
            "/+",
            "+/+",
            "a//b",
            "$SYS/#",
        ] {
            assert!(is_valid_topic_filter(ok), "{ok}");
        }
        for bad in [
            "",
            "sport/tennis#",
            "sport/tennis/#/ranking",
            "sport+",
            "a/b+/c",
            "#/a",
            "##",
        ] {
            assert!(!is_valid_topic_filter(bad), "{bad}");
        }
    }

    #[test]
    fn shared_names() {
        assert_eq!(shared_subscription("$share/g/a/b"), Some(("g", "a/b")));
        assert_eq!(shared_subscription("$share/g"), Some(("g", "")));
        assert_eq!(shared_subscription("a/b"), None);
    }

    #[test]
    fn topic_matching_follows_section_4_7() {
        for (f, t) in [
            ("a/b", "a/b"),
            ("a/+", "a/b"),
            ("a/#", "a"),
            ("a/#", "a/b/c"),
            ("#", "a/b"),
            ("+/+", "a/"),
            ("+", ""),
            ("$SYS/#", "$SYS/x"),
        ] {
            assert!(topic_matches(f, t), "{f} {t}");
        }
        for (f, t) in [
            ("a/b", "a/c"),
            ("a/+", "a/b/c"),
            ("a/+", "a"),
            ("#", "$SYS/x"),
            ("+/x", "$q/x"),
            ("a/b/c", "a/b"),
        ] {
            assert!(!topic_matches(f, t), "{f} {t}");
        }
    }
}
