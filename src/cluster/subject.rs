//! MQTT topic names and filters as NATS subjects, so NATS can do the cross-node matching
//! MQTT's rules ask for.
//!
//! | MQTT                          | NATS subject (prefix `P`)                         |
//! |-------------------------------|---------------------------------------------------|
//! | topic `a/b`                   | `P.m.a.b.%%`                                      |
//! | topic `$SYS/x`                | `P.s.$SYS.x.%%`                                   |
//! | topic `a//b` (empty level)    | `P.m.a.%.b.%%`                                    |
//! | topic `a.b/c d`               | `P.m.a%2Eb.c%20d.%%`                              |
//! | filter `a/+`                  | `P.m.a.*.%%`                                      |
//! | filter `a/#`                  | `P.m.a.>`                                         |
//! | filter `#`, `+/x`             | `P.m.>`, `P.m.*.x.%%`                             |
//! | filter `$SYS/#`               | `P.s.$SYS.>`                                      |
//!
//! Why each rule:
//! - **One token per level.** NATS's `*` matches one token and `>` one or more, like MQTT's
//!   `+` and `#` on levels.
//! - **Percent-encoding.** A level may hold the bytes NATS gives a meaning (`.`, `*`, `>`),
//!   whitespace NATS refuses, and anything outside printable ASCII, which NATS recommends
//!   against across clients. These become `%XX` (upper-case hex of each byte), and `%` itself
//!   becomes `%25`, so decoding is exact: the mapping is one-to-one (tested below).
//! - **Reserved tokens.** A token that is only `%` or `%%` never comes out of encoding, since
//!   encoding always writes `%` followed by two hex digits. `%` stands for an empty level
//!   (NATS tokens cannot be empty, MQTT levels can). `%%` ends every topic's subject.
//! - **The end token.** MQTT's `a/#` also matches `a` itself ([MQTT-4.7.1-2]). NATS's `a.>`
//!   needs at least one token after `a`, and the end token is that token. Without it, `a/#`
//!   would need two NATS subscriptions (`a` and `a.>`).
//! - **Two namespaces.** `m` holds ordinary topics and `s` holds topics that start with `$`.
//!   A filter that starts with a wildcard is mapped into `m` only, so it can never match a
//!   `$` topic ([MQTT-4.7.2-1]).
//!
//! A filter here is the topic filter itself. A shared subscription's `$share/{group}/` prefix
//! is taken off by the caller.

use std::fmt::Write as _;

/// The token that ends every topic's subject (see the module doc).
const END: &str = "%%";
/// The token for an empty topic level.
const EMPTY: &str = "%";
/// Namespace of topics that do not start with `$`.
const ORDINARY: &str = "m";
/// Namespace of topics that start with `$` (`$SYS/...`).
const DOLLAR: &str = "s";

/// A subject space under one prefix (a cluster's name, so that two clusters can share NATS
/// servers without seeing each other's messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

/// Why a string cannot be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// The prefix must be one or more NATS tokens of printable ASCII without wildcards.
    #[error("invalid subject prefix {0:?}")]
    Prefix(String),
    /// Not a subject this space made.
    #[error("not a topic subject of this space: {0:?}")]
    Foreign(String),
}

impl Subjects {
    /// A space under `prefix`: tokens of printable ASCII separated by `.`, without `*`, `>`
    /// or `%` and not starting with `$` (NATS reserves those subjects).
    pub fn new(prefix: &str) -> Result<Subjects, SubjectError> {
        let valid = !prefix.starts_with('$')
            && prefix.split('.').all(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_graphic() && !matches!(b, b'*' | b'>' | b'%'))
            });
        if valid {
            Ok(Subjects {
                prefix: prefix.to_string(),
            })
        } else {
            Err(SubjectError::Prefix(prefix.to_string()))
        }
    }

    /// The subject a message published to `topic` (a valid MQTT topic name: no wildcards,
    /// at least one character) is sent on.
    pub fn topic(&self, topic: &str) -> String {
        let mut s = self.start(topic);
        for level in topic.split('/') {
            s.push('.');
            push_level(&mut s, level);
        }
        s.push('.');
        s.push_str(END);
        s
    }

    /// The NATS subscription subject that receives exactly the topics `filter` (a valid MQTT
    /// topic filter) matches.
    pub fn filter(&self, filter: &str) -> String {
        let mut s = self.start(filter);
        let mut open = false;
        for level in filter.split('/') {
            s.push('.');
            match level {
                "#" => {
                    s.push('>');
                    open = true;
                }
                "+" => s.push('*'),
                _ => push_level(&mut s, level),
            }
        }
        if !open {
            s.push('.');
            s.push_str(END);
        }
        s
    }

    /// The topic a subject made by [`Subjects::topic`] stands for.
    pub fn topic_of(&self, subject: &str) -> Result<String, SubjectError> {
        let foreign = || SubjectError::Foreign(subject.to_string());
        let rest = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(foreign)?;
        let (space, rest) = rest.split_once('.').ok_or_else(foreign)?;
        let levels = rest
            .strip_suffix(END)
            .and_then(|r| r.strip_suffix('.'))
            .ok_or_else(foreign)?;
        let mut bytes = Vec::with_capacity(levels.len());
        for (i, token) in levels.split('.').enumerate() {
            if i > 0 {
                bytes.push(b'/');
            }
            if token != EMPTY {
                decode_level(token, &mut bytes).ok_or_else(foreign)?;
            }
        }
        let topic = String::from_utf8(bytes).map_err(|_| foreign())?;
        let dollar = topic.starts_with('$');
        match space {
            ORDINARY if !dollar => Ok(topic),
            DOLLAR if dollar => Ok(topic),
            _ => Err(foreign()),
        }
    }

    /// The prefix and the namespace `name` (a topic or filter) belongs in.
    fn start(&self, name: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + name.len() + 8);
        s.push_str(&self.prefix);
        s.push('.');
        s.push_str(if name.starts_with('$') {
            DOLLAR
        } else {
            ORDINARY
        });
        s
    }
}

/// Appends one topic level as a token.
fn push_level(s: &mut String, level: &str) {
    if level.is_empty() {
        s.push_str(EMPTY);
        return;
    }
    for &b in level.as_bytes() {
        if b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>' | b'%') {
            s.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(s, "%{b:02X}");
        }
    }
}

/// Decodes one token written by [`push_level`] (not the empty-level token); None if it is not
/// one.
fn decode_level(token: &str, out: &mut Vec<u8>) -> Option<()> {
    let b = token.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = token.get(i + 1..i + 3)?;
            if !hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c))
            {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::validate::topic_matches;
    use proptest::prelude::*;

    /// NATS's subject matching as its documentation states it: tokens split on `.`, `*`
    /// matches exactly one token, `>` (last token only) one or more.
    fn nats_matches(filter: &str, subject: &str) -> bool {
        let f: Vec<&str> = filter.split('.').collect();
        let s: Vec<&str> = subject.split('.').collect();
        for (i, ft) in f.iter().enumerate() {
            match (*ft, s.get(i)) {
                (">", Some(_)) => return i == f.len() - 1,
                ("*", Some(_)) => {}
                (a, Some(b)) if a == *b => {}
                _ => return false,
            }
        }
        f.len() == s.len()
    }

    fn space() -> Subjects {
        Subjects::new("tern.c1").unwrap()
    }

    #[test]
    fn the_table_of_the_module_doc() {
        let p = Subjects::new("P").unwrap();
        for (topic, subject) in [
            ("a/b", "P.m.a.b.%%"),
            ("$SYS/x", "P.s.$SYS.x.%%"),
            ("a//b", "P.m.a.%.b.%%"),
            ("a.b/c d", "P.m.a%2Eb.c%20d.%%"),
            ("/", "P.m.%.%.%%"),
            ("100%/>*", "P.m.100%25.%3E%2A.%%"),
            ("é", "P.m.%C3%A9.%%"),
        ] {
            assert_eq!(p.topic(topic), subject, "{topic}");
            assert_eq!(p.topic_of(subject).unwrap(), topic);
        }
        for (filter, subject) in [
            ("a/+", "P.m.a.*.%%"),
            ("a/#", "P.m.a.>"),
            ("#", "P.m.>"),
            ("+/x", "P.m.*.x.%%"),
            ("$SYS/#", "P.s.$SYS.>"),
            ("+", "P.m.*.%%"),
        ] {
            assert_eq!(p.filter(filter), subject, "{filter}");
        }
    }

    #[test]
    fn the_spec_examples_match_through_nats() {
        let p = space();
        let m = |f: &str, t: &str| nats_matches(&p.filter(f), &p.topic(t));
        // [MQTT-4.7.1-2]: "sport/#" matches "sport" and its children.
        assert!(m("sport/#", "sport"));
        assert!(m("sport/#", "sport/tennis/player1"));
        // "sport/+" does not match "sport" but matches "sport/".
        assert!(!m("sport/+", "sport"));
        assert!(m("sport/+", "sport/"));
        assert!(m("+/+", "/finance"));
        assert!(!m("+", "/finance"));
        // [MQTT-4.7.2-1]: wildcards at the start never match `$` topics.
        assert!(!m("#", "$SYS/monitor/Clients"));
        assert!(!m("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(m("$SYS/#", "$SYS/monitor/Clients"));
        assert!(m("$SYS/monitor/+", "$SYS/monitor/Clients"));
    }

    #[test]
    fn prefixes_and_foreign_subjects_are_refused() {
        for bad in ["", "a..b", "a.*", "a.>", "$SYS", "a b", "a.%", "é"] {
            assert!(Subjects::new(bad).is_err(), "{bad:?}");
        }
        assert!(Subjects::new("tern.cluster-1").is_ok());
        let p = space();
        for foreign in [
            "tern.c1.m.a",      // no end token
            "tern.c2.m.a.%%",   // another prefix
            "tern.c1.x.a.%%",   // no such namespace
            "tern.c1.m.$a.%%",  // a `$` topic in the ordinary namespace
            "tern.c1.s.a.%%",   // an ordinary topic in the `$` namespace
            "tern.c1.m.%2.%%",  // a cut escape
            "tern.c1.m.%2e.%%", // lower-case hex is never written
            "tern.c1.m.%FF.%%", // not UTF-8
            "tern.c1.m.%%",     // no level at all
        ] {
            assert!(p.topic_of(foreign).is_err(), "{foreign}");
        }
    }

    /// Levels built from the bytes the mapping must take care of.
    fn level() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just("a"),
                Just("b"),
                Just("."),
                Just("*"),
                Just(">"),
                Just("%"),
                Just("%%"),
                Just("%25"),
                Just(" "),
                Just("\t"),
                Just("$"),
                Just("é"),
                Just("\u{7f}"),
            ],
            0..3,
        )
        .prop_map(|parts| parts.concat())
    }

    fn topic() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..5)
            .prop_map(|l| l.join("/"))
            .prop_filter("a topic name has at least one character", |t| !t.is_empty())
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            proptest::collection::vec(prop_oneof![level(), Just("+".to_string())], 0..4),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash {
                    levels.push("#".to_string());
                }
                levels.join("/")
            })
            .prop_filter("a filter has at least one character", |f| !f.is_empty())
    }

    proptest! {
        /// NATS matching of the mapped filter and topic agrees with MQTT's rules (the trie's
        /// spec-prose reference matcher) for every filter and topic.
        #[test]
        fn nats_matching_is_mqtt_matching(f in filter(), t in topic()) {
            let p = space();
            prop_assert_eq!(
                nats_matches(&p.filter(&f), &p.topic(&t)),
                topic_matches(&f, &t),
                "filter {:?} ({}) topic {:?} ({})", f, p.filter(&f), t, p.topic(&t)
            );
        }

        /// Every topic's subject is a valid NATS subject for publishing and decodes back to
        /// the topic, so no two topics share a subject.
        #[test]
        fn topics_map_one_to_one(t in topic()) {
            let p = space();
            let s = p.topic(&t);
            prop_assert!(s.bytes().all(|b| b.is_ascii_graphic()), "{}", s);
            prop_assert!(s.split('.').all(|tok| !tok.is_empty() && tok != "*" && tok != ">"));
            prop_assert_eq!(p.topic_of(&s).unwrap(), t);
        }
    }
}
