//! `[auth] acl_file`: per-user topic rules in Mosquitto's `acl_file` syntax, so a file written
//! for Mosquitto works here unchanged.
//!
//! ```text
//! # Lines before the first `user` line apply to anonymous clients (no username).
//! topic read $SYS/#
//!
//! user alice
//! topic readwrite sensors/#
//! topic deny sensors/secret
//!
//! # Patterns apply to every client, wherever they appear in the file.
//! pattern write devices/%c/status
//! pattern readwrite users/%u/#
//! ```
//!
//! Once a file is configured, anything it does not grant is refused. The rules:
//!
//! - `topic [read|write|readwrite|deny] FILTER` belongs to the section it is in: the anonymous
//!   one before any `user NAME` line, else that user's. The access word may be left out only
//!   when the filter has no space in it; it then means `readwrite`.
//! - `pattern [read|write|readwrite|deny] FILTER` applies to every client, with `%u` replaced by
//!   the username and `%c` by the client id anywhere in the filter. A pattern with `%u` does
//!   not apply to anonymous clients.
//! - A matching `deny` refuses both reading and writing and beats any grant, whichever section
//!   or line it comes from.
//! - `read` governs both SUBSCRIBE (the rule's filter must cover the whole requested filter) and
//!   each delivery (the rule's filter must match the message's topic); `write` governs PUBLISH.
//! - A wildcard at the first level never matches a topic starting with `$` (MQTT 4.7.2), so
//!   `topic read #` does not grant `$SYS/...`.
//!
//! Checks run on every delivery to every subscriber, so rules are compiled once at load: split
//! into levels, grouped per user, denies apart from grants; `%u`/`%c` are compared in place
//! against the topic's level rather than substituted into a new string.

use std::collections::HashMap;
use std::path::Path;

use crate::protocol::validate::{is_valid_topic_filter, shared_subscription};

/// Why an ACL file was refused. The broker does not start on any of these: silently skipping a
/// rule it could not read would change who may see what.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("cannot read acl_file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{origin}:{line}: unknown keyword `{keyword}` (expected `user`, `topic` or `pattern`)"
    )]
    UnknownKeyword {
        origin: String,
        line: usize,
        keyword: String,
    },
    #[error(
        "{origin}:{line}: unknown access `{access}` (expected `read`, `write`, `readwrite` or \
         `deny`; a filter containing a space needs an explicit access word)"
    )]
    BadAccess {
        origin: String,
        line: usize,
        access: String,
    },
    #[error("{origin}:{line}: `{keyword}` without a topic filter")]
    EmptyFilter {
        origin: String,
        line: usize,
        keyword: &'static str,
    },
    #[error("{origin}:{line}: invalid topic filter `{filter}`")]
    InvalidFilter {
        origin: String,
        line: usize,
        filter: String,
    },
    #[error("{origin}:{line}: `user` without a username")]
    MissingUsername { origin: String, line: usize },
}

impl AclError {
    /// The 1-based line the error is on; `None` when the file could not be read at all.
    pub fn line(&self) -> Option<usize> {
        match self {
            AclError::Read { .. } => None,
            AclError::UnknownKeyword { line, .. }
            | AclError::BadAccess { line, .. }
            | AclError::EmptyFilter { line, .. }
            | AclError::InvalidFilter { line, .. }
            | AclError::MissingUsername { line, .. } => Some(*line),
        }
    }
}

/// A compiled `acl_file`. Immutable once loaded, so checks need no lock.
#[derive(Debug, Default)]
pub struct Acl {
    /// `topic` lines before the first `user` line.
    anonymous: Section,
    /// `topic` lines per username; repeated `user` sections of one name are merged, as
    /// Mosquitto does.
    users: HashMap<Box<str>, Section>,
    /// `pattern` lines, wherever they appear.
    patterns: Section,
    /// Some pattern has `%u` or `%c`: only then is the identity inspected for `/`.
    substitutes: bool,
}

/// Rules of one section, denies kept apart so they are all tried before any grant.
#[derive(Debug, Default)]
struct Section {
    deny: Vec<Rule>,
    grant: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    levels: Box<[Level]>,
    read: bool,
    write: bool,
    /// Whether the rule can match a topic starting with `$`: only when its own text starts with
    /// `$`. Covers wildcards at the first level ([MQTT-4.7.2-1]) and also a `%c`/`%u` there, so
    /// a client cannot name itself `$SYS` to reach broker topics through `pattern read %c/#`.
    dollar: bool,
    /// Has `%u`: never applies to anonymous clients.
    needs_user: bool,
    /// Has `%u` or `%c` somewhere.
    substitutes: bool,
}

#[derive(Debug, Clone)]
enum Level {
    Literal(Box<str>),
    Plus,
    Hash,
    /// A pattern level containing `%u`/`%c`, e.g. `%u`, `dev-%c` or `%u.%c`.
    Subst(Box<[Piece]>),
}

#[derive(Debug, Clone)]
enum Piece {
    Text(Box<str>),
    User,
    Client,
}

/// Who is asking. `slash` is set when a substituted value contains `/` and so spans several
/// levels; such rules take the slow path of substituting into a fresh list of levels.
struct Ident<'a> {
    user: Option<&'a str>,
    client: &'a str,
    slash: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// A topic name the client wants to publish to.
    Publish,
    /// A topic name of a message about to be delivered to the client.
    Receive,
    /// A topic filter (possibly with wildcards) the client wants to subscribe to.
    Subscribe,
}

#[derive(Debug, Clone, Copy)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn parse(word: &str) -> Option<Access> {
        match word {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            "readwrite" => Some(Access::ReadWrite),
            "deny" => Some(Access::Deny),
            _ => None,
        }
    }
}

/// Reads and compiles `path`. Errors name the file and line.
pub fn load(path: &Path) -> Result<Acl, AclError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| AclError::Read {
        path: origin.clone(),
        source,
    })?;
    parse(&text, &origin)
}

/// Compiles ACL text; `origin` (usually the file's path) names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Acl, AclError> {
    let mut acl = Acl::default();
    // The section `topic` lines go to: `None` for anonymous clients until a `user` line.
    let mut user: Option<Box<str>> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (keyword, rest) = split_word(trimmed);
        match keyword {
            "user" => {
                if rest.is_empty() {
                    return Err(AclError::MissingUsername {
                        origin: origin.to_string(),
                        line,
                    });
                }
                // The rest of the line, spaces included, is the name (as in Mosquitto).
                acl.users.entry(rest.into()).or_default();
                user = Some(rest.into());
            }
            "topic" | "pattern" => {
                let pattern = keyword == "pattern";
                let keyword = if pattern { "pattern" } else { "topic" };
                let (access, filter) = access_and_filter(rest, origin, line, keyword)?;
                if !is_valid_topic_filter(filter) {
                    return Err(AclError::InvalidFilter {
                        origin: origin.to_string(),
                        line,
                        filter: filter.to_string(),
                    });
                }
                let rule = Rule::compile(filter, access, pattern);
                acl.substitutes |= rule.substitutes;
                let section = if pattern {
                    &mut acl.patterns
                } else if let Some(name) = &user {
                    acl.users.entry(name.clone()).or_default()
                } else {
                    &mut acl.anonymous
                };
                if matches!(access, Access::Deny) {
                    section.deny.push(rule);
                } else {
                    section.grant.push(rule);
                }
            }
            other => {
                return Err(AclError::UnknownKeyword {
                    origin: origin.to_string(),
                    line,
                    keyword: other.to_string(),
                })
            }
        }
    }
    Ok(acl)
}

/// The first whitespace-separated word and the rest, with the rest's leading blanks removed.
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim_start()),
        None => (s, ""),
    }
}

/// Splits `[ACCESS] FILTER`. As in Mosquitto, the access word is optional only for a filter of
/// one word; with more words the first must be an access word, so a typo such as
/// `topic raed a/#` is an error rather than a grant on the topic `raed a/#`. A lone access word
/// (`topic read`) is refused as a missing filter, where Mosquitto would grant `readwrite` on the
/// topic named `read`; that line is far likelier a rule with its filter forgotten.
fn access_and_filter<'a>(
    rest: &'a str,
    origin: &str,
    line: usize,
    keyword: &'static str,
) -> Result<(Access, &'a str), AclError> {
    let empty = || AclError::EmptyFilter {
        origin: origin.to_string(),
        line,
        keyword,
    };
    if rest.is_empty() {
        return Err(empty());
    }
    let (first, filter) = split_word(rest);
    if filter.is_empty() {
        return match Access::parse(first) {
            Some(_) => Err(empty()),
            None => Ok((Access::ReadWrite, first)),
        };
    }
    match Access::parse(first) {
        Some(access) => Ok((access, filter)),
        None => Err(AclError::BadAccess {
            origin: origin.to_string(),
            line,
            access: first.to_string(),
        }),
    }
}

impl Rule {
    /// `filter` is a valid topic filter. `%u`/`%c` are placeholders only in patterns; in a
    /// `topic` line they are literal text, as in Mosquitto.
    fn compile(filter: &str, access: Access, pattern: bool) -> Rule {
        let levels: Box<[Level]> = filter
            .split('/')
            .map(|level| match level {
                "+" => Level::Plus,
                "#" => Level::Hash,
                _ if pattern && (level.contains("%u") || level.contains("%c")) => {
                    Level::Subst(pieces(level))
                }
                _ => Level::Literal(level.into()),
            })
            .collect();
        let substitutes = levels.iter().any(|l| matches!(l, Level::Subst(_)));
        let (read, write) = match access {
            Access::Read => (true, false),
            Access::Write => (false, true),
            Access::ReadWrite => (true, true),
            Access::Deny => (false, false),
        };
        Rule {
            levels,
            read,
            write,
            dollar: filter.starts_with('$'),
            needs_user: pattern && filter.contains("%u"),
            substitutes,
        }
    }

    /// Whether this rule applies to `subject` (a topic name, or a filter it must cover for
    /// SUBSCRIBE), regardless of its access.
    fn hits(&self, check: Check, subject: &str, id: &Ident) -> bool {
        if subject.starts_with('$') && !self.dollar {
            return false;
        }
        let filter = check == Check::Subscribe;
        if self.substitutes && id.slash {
            return walk(&self.expand(id), subject, filter, id);
        }
        walk(&self.levels, subject, filter, id)
    }

    fn grants(&self, check: Check) -> bool {
        match check {
            Check::Publish => self.write,
            Check::Receive | Check::Subscribe => self.read,
        }
    }

    /// The levels with `%u`/`%c` substituted, where a value containing `/` spans several levels
    /// (Mosquitto substitutes text, so `dev/%c/#` for client `a/b` is `dev/a/b/#`). Substituted
    /// text always stays literal: a `+` in a client id is not a wildcard.
    fn expand(&self, id: &Ident) -> Vec<Level> {
        let mut out = Vec::with_capacity(self.levels.len() + 2);
        for level in self.levels.iter() {
            let Level::Subst(pieces) = level else {
                out.push(level.clone());
                continue;
            };
            let mut text = String::new();
            for piece in pieces.iter() {
                text.push_str(match piece {
                    Piece::Text(t) => t,
                    Piece::User => id.user.unwrap_or_default(),
                    Piece::Client => id.client,
                });
            }
            out.extend(text.split('/').map(|part| Level::Literal(part.into())));
        }
        out
    }
}

/// Splits a pattern level into text and placeholders. Only `%u` and `%c` are placeholders; any
/// other `%` is literal, as in Mosquitto.
fn pieces(level: &str) -> Box<[Piece]> {
    let mut out = Vec::new();
    let mut rest = level;
    while let Some(at) = rest.find('%') {
        let placeholder = match rest.as_bytes().get(at + 1) {
            Some(b'u') => Piece::User,
            Some(b'c') => Piece::Client,
            _ => {
                // A lone `%`: keep it with the text before and carry on after it.
                let (before, after) = rest.split_at(at + 1);
                push_text(&mut out, before);
                rest = after;
                continue;
            }
        };
        push_text(&mut out, &rest[..at]);
        out.push(placeholder);
        rest = &rest[at + 2..];
    }
    push_text(&mut out, rest);
    out.into_boxed_slice()
}

/// Appends text, merging with a preceding text piece so comparison walks fewer pieces.
fn push_text(out: &mut Vec<Piece>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(Piece::Text(prev)) = out.last_mut() {
        *prev = format!("{prev}{text}").into();
    } else {
        out.push(Piece::Text(text.into()));
    }
}

/// Matches rule levels against `subject`. With `filter` false, `subject` is a topic name and
/// this is ordinary MQTT matching. With `filter` true, `subject` is a topic filter and this
/// asks whether every topic it matches is matched by the rule: its `+` is covered only by the
/// rule's `+` or `#`, its `#` only by the rule's `#`. (`$` topics are handled by the caller.)
fn walk(levels: &[Level], subject: &str, filter: bool, id: &Ident) -> bool {
    let mut parts = subject.split('/');
    for level in levels {
        if matches!(level, Level::Hash) {
            // `#` also matches the parent level: `a/#` matches `a` (MQTT 4.7.1.2).
            return true;
        }
        let Some(part) = parts.next() else {
            return false;
        };
        let ok = match (filter, part) {
            (true, "#") => false,
            (true, "+") => matches!(level, Level::Plus),
            _ => level_matches(level, part, id),
        };
        if !ok {
            return false;
        }
    }
    parts.next().is_none()
}

fn level_matches(level: &Level, part: &str, id: &Ident) -> bool {
    match level {
        Level::Literal(text) => **text == *part,
        Level::Plus | Level::Hash => true,
        Level::Subst(pieces) => {
            // Consume the topic level piece by piece instead of building the substituted text.
            let mut rest = part;
            for piece in pieces.iter() {
                let expected = match piece {
                    Piece::Text(t) => &**t,
                    Piece::Client => id.client,
                    Piece::User => match id.user {
                        Some(user) => user,
                        // Rules with `%u` are skipped for anonymous clients before this.
                        None => return false,
                    },
                };
                match rest.strip_prefix(expected) {
                    Some(after) => rest = after,
                    None => return false,
                }
            }
            rest.is_empty()
        }
    }
}

/// Whether the topic filter `rule` covers every topic the topic filter `filter` matches, by
/// the ACL's own SUBSCRIBE rule (`a/#` covers `a/b/#` and `a/+`; `a/b` does not cover `a/#`;
/// a rule starting with a wildcard covers no `$` filter). For other rule sets with the ACL's
/// semantics (a token's claims, `chain::ClaimRules`); `%u`/`%c` are literal text here.
pub fn covers(rule: &str, filter: &str) -> bool {
    let id = Ident {
        user: None,
        client: "",
        slash: false,
    };
    is_valid_topic_filter(rule)
        && is_valid_topic_filter(filter)
        && Rule::compile(rule, Access::Read, false).hits(Check::Subscribe, filter, &id)
}

impl Acl {
    /// SUBSCRIBE: some read rule must cover the whole filter (`topic read a/#` allows `a/b/#`
    /// and `a/+`; `topic read a/b` does not allow `a/#`), and no deny rule may cover it. A deny
    /// covering only part of the filter does not refuse the subscription: those messages are
    /// withheld by [`Acl::can_receive`] instead, which the caller must still apply to every
    /// delivery. A shared subscription (`$share/NAME/FILTER`) is judged by its FILTER.
    pub fn can_subscribe(&self, username: Option<&str>, client_id: &str, filter: &str) -> bool {
        let filter = shared_subscription(filter).map_or(filter, |(_, f)| f);
        is_valid_topic_filter(filter) && self.allows(username, client_id, Check::Subscribe, filter)
    }

    /// PUBLISH (and a Will, both at CONNECT and when it is sent): a write rule must match the
    /// topic name and no deny rule may.
    pub fn can_publish(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        !topic.is_empty()
            && !topic.contains(['+', '#'])
            && self.allows(username, client_id, Check::Publish, topic)
    }

    /// Delivery of a message on `topic` (a valid topic name) to the client: a read rule must
    /// match it and no deny rule may. Checked on every delivery path, because a subscription
    /// to a wide filter (`#`) may have been allowed by rules that cover only parts of it.
    pub fn can_receive(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.allows(username, client_id, Check::Receive, topic)
    }

    fn allows(&self, username: Option<&str>, client_id: &str, check: Check, subject: &str) -> bool {
        let section = match username {
            Some(name) => self.users.get(name),
            None => Some(&self.anonymous),
        };
        let id = Ident {
            user: username,
            client: client_id,
            slash: self.substitutes
                && (client_id.contains('/') || username.is_some_and(|u| u.contains('/'))),
        };
        let applies = |rule: &&Rule| username.is_some() || !rule.needs_user;
        let hits = |rule: &Rule| rule.hits(check, subject, &id);

        // Every deny first, patterns included: a deny means "never", whichever grant overlaps.
        let denied = section.is_some_and(|s| s.deny.iter().any(hits))
            || self.patterns.deny.iter().filter(applies).any(hits);
        if denied {
            return false;
        }
        let grants = |rule: &Rule| rule.grants(check) && rule.hits(check, subject, &id);
        if section.is_some_and(|s| s.grant.iter().any(grants)) {
            return true;
        }
        // As Mosquitto (since 1.4.12, CVE-2017-7650): a username or client id containing a
        // wildcard gets nothing from patterns, so a client cannot pick an identity meant to
        // reach other clients' places in the hierarchy.
        if self.patterns.grant.is_empty()
            || client_id.contains(['+', '#'])
            || username.is_some_and(|u| u.contains(['+', '#']))
        {
            return false;
        }
        self.patterns.grant.iter().filter(applies).any(grants)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::validate::topic_matches;
    use proptest::prelude::*;

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Sub,
        Pub,
        Recv,
    }

    fn check(acl: &Acl, user: Option<&str>, client: &str, op: Op, subject: &str) -> bool {
        match op {
            Op::Sub => acl.can_subscribe(user, client, subject),
            Op::Pub => acl.can_publish(user, client, subject),
            Op::Recv => acl.can_receive(user, client, subject),
        }
    }

    const ANON: &str = "\
# anonymous section
topic read public/#
topic write  public/inbox

  # indented comment
topic status

user alice
topic readwrite alice/#
topic read shared/+/news
user bob
topic write bob/out
user alice
topic read later/#
";

    const DENY: &str = "\
topic readwrite a/#
topic deny a/secret
topic deny a/private/#
topic readwrite #
topic deny +/hidden
";

    const PATTERNS: &str = "\
pattern readwrite users/%u/#
pattern read devices/%c/in
pattern write devices/%c/out
pattern read mix/%u-%c/x
pattern write $SYS/broker/connection/%c/state
pattern read %c/#
pattern read pct/100%/%c
pattern deny users/%u/locked/#
user carol
topic readwrite users/#
";

    const SPACES: &str = "\
topic read my topic/with spaces
user some one
topic readwrite  rooms/living room/#   
";

    const SYS: &str = "\
topic read #
topic readwrite +/status
user admin
topic read $SYS/#
topic read #
";

    const COVER: &str = "\
topic read a/#
topic read b/+
topic read c/d
topic read +/e
topic read f/+/#
";

    const WRITE_ONLY: &str = "topic write w/#\ntopic read r/#\n";

    /// (acl text, username, client id, operation, topic or filter, expected).
    type Case = (
        &'static str,
        Option<&'static str>,
        &'static str,
        Op,
        &'static str,
        bool,
    );

    #[rustfmt::skip]
    const CASES: &[Case] = &[
        // Anonymous section applies to clients without a username only.
        (ANON, None, "c", Op::Recv, "public/x", true),
        (ANON, None, "c", Op::Sub, "public/#", true),
        (ANON, None, "c", Op::Pub, "public/x", false),
        (ANON, None, "c", Op::Pub, "public/inbox", true),
        (ANON, None, "c", Op::Recv, "public/inbox", true),
        (ANON, None, "c", Op::Pub, "status", true), // readwrite by default
        (ANON, None, "c", Op::Recv, "status", true),
        (ANON, None, "c", Op::Sub, "status", true),
        (ANON, None, "c", Op::Recv, "alice/x", false),
        (ANON, Some("alice"), "c", Op::Recv, "public/x", false),
        (ANON, Some("nobody"), "c", Op::Recv, "public/x", false),
        (ANON, Some("nobody"), "c", Op::Pub, "status", false),
        // User sections, including a name repeated later in the file.
        (ANON, Some("alice"), "c", Op::Pub, "alice/a/b", true),
        (ANON, Some("alice"), "c", Op::Sub, "alice/#", true),
        (ANON, Some("alice"), "c", Op::Recv, "shared/x/news", true),
        (ANON, Some("alice"), "c", Op::Pub, "shared/x/news", false),
        (ANON, Some("alice"), "c", Op::Recv, "later/x", true),
        (ANON, Some("alice"), "c", Op::Pub, "bob/out", false),
        (ANON, Some("bob"), "c", Op::Pub, "bob/out", true),
        (ANON, Some("bob"), "c", Op::Recv, "bob/out", false),
        (ANON, Some("bob"), "c", Op::Sub, "bob/out", false),
        (ANON, Some("bob"), "c", Op::Recv, "alice/x", false),
        (ANON, Some("Alice"), "c", Op::Recv, "alice/x", false), // names are case-sensitive
        // Deny beats grants, in whatever order the lines come.
        (DENY, None, "c", Op::Pub, "a/x", true),
        (DENY, None, "c", Op::Pub, "a/secret", false),
        (DENY, None, "c", Op::Recv, "a/secret", false),
        (DENY, None, "c", Op::Sub, "a/secret", false),
        (DENY, None, "c", Op::Recv, "a/secret/x", true), // `a/secret` is one topic only
        (DENY, None, "c", Op::Recv, "a/private", false), // `#` includes its parent
        (DENY, None, "c", Op::Recv, "a/private/x/y", false),
        (DENY, None, "c", Op::Sub, "a/private/+", false),
        (DENY, None, "c", Op::Sub, "a/#", true), // partial overlap: withheld per message
        (DENY, None, "c", Op::Sub, "#", true),
        (DENY, None, "c", Op::Recv, "x/hidden", false),
        (DENY, None, "c", Op::Pub, "z/hidden", false),
        (DENY, None, "c", Op::Sub, "+/hidden", false),
        (DENY, None, "c", Op::Recv, "x/hidden/y", true),
        // Patterns: %u and %c anywhere in a level; %u never for anonymous clients.
        (PATTERNS, Some("dave"), "c1", Op::Pub, "users/dave/x", true),
        (PATTERNS, Some("dave"), "c1", Op::Recv, "users/dave", true),
        (PATTERNS, Some("dave"), "c1", Op::Sub, "users/dave/#", true),
        (PATTERNS, Some("dave"), "c1", Op::Pub, "users/erin/x", false),
        (PATTERNS, Some("dave"), "c1", Op::Sub, "users/+/x", false),
        (PATTERNS, Some("dave"), "c1", Op::Sub, "users/#", false),
        (PATTERNS, None, "c1", Op::Pub, "users//x", false),
        (PATTERNS, None, "c1", Op::Recv, "devices/c1/in", true),
        (PATTERNS, None, "c1", Op::Pub, "devices/c1/in", false),
        (PATTERNS, None, "c1", Op::Pub, "devices/c1/out", true),
        (PATTERNS, None, "c2", Op::Pub, "devices/c1/out", false),
        (PATTERNS, Some("dave"), "c1", Op::Recv, "mix/dave-c1/x", true),
        (PATTERNS, Some("dave"), "c1", Op::Recv, "mix/dave-c2/x", false),
        (PATTERNS, Some("dave"), "c1", Op::Recv, "mix/dave-c1x/x", false),
        (PATTERNS, None, "c1", Op::Recv, "mix/-c1/x", false),
        (PATTERNS, None, "c1", Op::Pub, "$SYS/broker/connection/c1/state", true),
        (PATTERNS, None, "c1", Op::Pub, "$SYS/broker/connection/c2/state", false),
        (PATTERNS, None, "c1", Op::Recv, "c1/anything/below", true),
        (PATTERNS, None, "c1", Op::Recv, "pct/100%/c1", true),
        // Pattern deny applies to every client, even over a user's own topic grant.
        (PATTERNS, Some("dave"), "c1", Op::Pub, "users/dave/locked/x", false),
        (PATTERNS, Some("carol"), "c1", Op::Pub, "users/carol/locked", false),
        (PATTERNS, Some("carol"), "c1", Op::Pub, "users/dave/locked", true),
        (PATTERNS, Some("carol"), "c1", Op::Sub, "users/#", true),
        // Wildcards in an identity buy nothing from patterns (CVE-2017-7650) ...
        (PATTERNS, None, "+", Op::Recv, "devices/+/in", false),
        (PATTERNS, None, "+", Op::Sub, "devices/+/in", false),
        (PATTERNS, None, "#", Op::Sub, "#", false),
        (PATTERNS, Some("#"), "c1", Op::Sub, "users/#", false),
        (PATTERNS, Some("#"), "c1", Op::Recv, "devices/c1/in", false),
        // ... a `/` in an identity spans levels, as Mosquitto's text substitution does ...
        (PATTERNS, None, "a/b", Op::Recv, "devices/a/b/in", true),
        (PATTERNS, None, "a/b", Op::Recv, "devices/a/in", false),
        (PATTERNS, None, "a/b", Op::Sub, "a/b/#", true),
        (PATTERNS, None, "a/b", Op::Sub, "a/#", false),
        (PATTERNS, Some("d/e"), "c1", Op::Pub, "users/d/e/x", true),
        (PATTERNS, Some("d/e"), "c1", Op::Pub, "users/d/e/locked/x", false),
        // ... and an identity cannot reach `$` topics by starting with `$`.
        (PATTERNS, None, "$SYS", Op::Recv, "$SYS/broker/x", false),
        (PATTERNS, None, "$SYS", Op::Sub, "$SYS/#", false),
        (PATTERNS, None, "$SYS/x", Op::Recv, "$SYS/x/y", false),
        // Filters and usernames containing spaces.
        (SPACES, None, "c", Op::Recv, "my topic/with spaces", true),
        (SPACES, None, "c", Op::Recv, "my topic", false),
        (SPACES, Some("some one"), "c", Op::Pub, "rooms/living room/lamp", true),
        (SPACES, Some("some one"), "c", Op::Pub, "rooms/living room", true),
        (SPACES, Some("some"), "c", Op::Pub, "rooms/living room/lamp", false),
        // `$` topics: wildcards at the first level do not grant them.
        (SYS, None, "c", Op::Recv, "$SYS/broker/uptime", false),
        (SYS, None, "c", Op::Sub, "$SYS/#", false),
        (SYS, None, "c", Op::Sub, "#", true),
        (SYS, None, "c", Op::Recv, "x/y", true),
        (SYS, None, "c", Op::Pub, "$x/status", false),
        (SYS, None, "c", Op::Pub, "x/status", true),
        (SYS, Some("admin"), "c", Op::Recv, "$SYS/broker/uptime", true),
        (SYS, Some("admin"), "c", Op::Sub, "$SYS/#", true),
        (SYS, Some("admin"), "c", Op::Sub, "$SYS/broker/+", true),
        (SYS, Some("admin"), "c", Op::Recv, "$other/x", false),
        // SUBSCRIBE: the rule's filter must cover the requested filter.
        (COVER, None, "c", Op::Sub, "a/#", true),
        (COVER, None, "c", Op::Sub, "a/b/#", true),
        (COVER, None, "c", Op::Sub, "a/+", true),
        (COVER, None, "c", Op::Sub, "a/+/+/x", true),
        (COVER, None, "c", Op::Sub, "a", true), // `a/#` matches its parent `a`
        (COVER, None, "c", Op::Sub, "+/#", false),
        (COVER, None, "c", Op::Sub, "#", false),
        (COVER, None, "c", Op::Sub, "b/x", true),
        (COVER, None, "c", Op::Sub, "b/+", true),
        (COVER, None, "c", Op::Sub, "b/#", false),
        (COVER, None, "c", Op::Sub, "b/x/y", false),
        (COVER, None, "c", Op::Sub, "b", false),
        (COVER, None, "c", Op::Sub, "c/d", true),
        (COVER, None, "c", Op::Sub, "c/#", false),
        (COVER, None, "c", Op::Sub, "c/+", false),
        (COVER, None, "c", Op::Sub, "x/e", true),
        (COVER, None, "c", Op::Sub, "+/e", true),
        (COVER, None, "c", Op::Sub, "$x/e", false),
        (COVER, None, "c", Op::Sub, "f/x", true),
        (COVER, None, "c", Op::Sub, "f/+/#", true),
        (COVER, None, "c", Op::Sub, "f/#", false), // `f/#` includes `f`; `f/+/#` does not
        (COVER, None, "c", Op::Sub, "$share/g/a/#", true), // judged by the inner filter
        (COVER, None, "c", Op::Sub, "$share/g/c/#", false),
        (COVER, None, "c", Op::Sub, "a/b#", false), // malformed filters are refused
        (COVER, None, "c", Op::Sub, "", false),
        // Write-only and read-only rules.
        (WRITE_ONLY, None, "c", Op::Pub, "w/x", true),
        (WRITE_ONLY, None, "c", Op::Recv, "w/x", false),
        (WRITE_ONLY, None, "c", Op::Sub, "w/#", false),
        (WRITE_ONLY, None, "c", Op::Pub, "r/x", false),
        (WRITE_ONLY, None, "c", Op::Pub, "w/+", false), // not a topic name
        (WRITE_ONLY, None, "c", Op::Pub, "", false),
        // An empty file grants nothing.
        ("", None, "c", Op::Recv, "a", false),
        ("# only a comment\n", Some("u"), "c", Op::Sub, "#", false),
    ];

    #[test]
    fn table() {
        let mut failures = Vec::new();
        for (i, &(text, user, client, op, subject, expected)) in CASES.iter().enumerate() {
            let acl = match parse(text, "test.acl") {
                Ok(acl) => acl,
                Err(e) => panic!("case {i}: {e}"),
            };
            if check(&acl, user, client, op, subject) != expected {
                failures.push(format!(
                    "case {i}: {op:?} {subject:?} by {user:?}/{client:?}: expected {expected}"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        fn kind(e: &AclError) -> String {
            match e {
                AclError::Read { .. } => "read".into(),
                AclError::UnknownKeyword { keyword, .. } => format!("keyword {keyword}"),
                AclError::BadAccess { access, .. } => format!("access {access}"),
                AclError::EmptyFilter { keyword, .. } => format!("empty {keyword}"),
                AclError::InvalidFilter { filter, .. } => format!("filter {filter}"),
                AclError::MissingUsername { .. } => "username".into(),
            }
        }
        #[rustfmt::skip]
        let cases: &[(&str, usize, &str)] = &[
            ("topic read a\nfoo bar\n", 2, "keyword foo"),
            ("Topic read a\n", 1, "keyword Topic"),
            ("\n\n# c\ntopic raed a/#\n", 4, "access raed"),
            ("topic a b\n", 1, "access a"),
            ("user u\ntopic\n", 2, "empty topic"),
            ("pattern   \n", 1, "empty pattern"),
            ("topic read\n", 1, "empty topic"),
            ("topic ok\ntopic read a/#/b\n", 2, "filter a/#/b"),
            ("topic read a+\n", 1, "filter a+"),
            ("pattern write x/%c#\n", 1, "filter x/%c#"),
            ("topic read a/# # trailing comment\n", 1, "filter a/# # trailing comment"),
            ("topic x\nuser\n", 2, "username"),
        ];
        for (text, line, expect) in cases {
            let err = match parse(text, "/etc/tern/acl") {
                Ok(_) => panic!("{text:?} parsed"),
                Err(e) => e,
            };
            assert_eq!(err.line(), Some(*line), "{text:?}: {err}");
            assert_eq!(kind(&err), *expect, "{text:?}: {err}");
            let shown = err.to_string();
            assert!(
                shown.starts_with(&format!("/etc/tern/acl:{line}: ")),
                "{shown}"
            );
        }
    }

    #[test]
    fn crlf_and_tabs() {
        let acl = match parse("user\tu\r\ntopic\tread\ta/#\r\n", "t") {
            Ok(acl) => acl,
            Err(e) => panic!("{e}"),
        };
        assert!(acl.can_receive(Some("u"), "c", "a/b"));
        assert!(!acl.can_publish(Some("u"), "c", "a/b"));
    }

    #[test]
    fn load_reads_a_file_and_reports_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("tern-acl-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("acl");
        std::fs::write(&path, "topic read a/#\ntopic bogus x y\n").unwrap();
        let err = load(&path).err();
        assert_eq!(err.as_ref().and_then(AclError::line), Some(2));
        std::fs::write(&path, "topic read a/#\n").unwrap();
        assert!(load(&path).is_ok_and(|acl| acl.can_receive(None, "c", "a/b")));
        let _ = std::fs::remove_dir_all(&dir);
        let missing = load(&dir.join("missing"));
        assert!(matches!(missing, Err(AclError::Read { .. })));
    }

    fn level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["a", "b", "$s", "c d", ""])
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..4)
            .prop_map(|l| l.join("/"))
            .prop_filter("non-empty", |t| !t.is_empty())
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop_oneof![level(), Just("+")], 0..4),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash || levels.is_empty() {
                    levels.push("#");
                }
                levels.join("/")
            })
            .prop_filter("non-empty", |f| !f.is_empty())
    }

    fn access() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["read", "write", "readwrite"])
    }

    /// Every topic of up to three levels over the generators' alphabet.
    fn universe() -> Vec<String> {
        let alphabet = ["a", "b", "$s", "c d", ""];
        let mut out: Vec<String> = alphabet.iter().map(|s| s.to_string()).collect();
        let mut last = out.clone();
        for _ in 0..2 {
            last = last
                .iter()
                .flat_map(|t| alphabet.iter().map(move |l| format!("{t}/{l}")))
                .collect();
            out.extend(last.iter().cloned());
        }
        out.retain(|t| !t.is_empty());
        out
    }

    proptest! {
        /// For a topic name, subscribing to exactly it and receiving on it are the same question.
        #[test]
        fn subscribe_to_a_topic_is_receive(
            rules in prop::collection::vec((access(), filter()), 0..6),
            topic in topic(),
        ) {
            let text: String = rules.iter().map(|(a, f)| format!("topic {a} {f}\n")).collect();
            let acl = parse(&text, "prop").map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(
                acl.can_subscribe(None, "c", &topic),
                acl.can_receive(None, "c", &topic)
            );
        }

        /// `covers` is the one-rule ACL's SUBSCRIBE check, and a covered filter matches no
        /// topic outside the rule.
        #[test]
        fn covers_is_the_subscribe_check(rule in filter(), sub in filter()) {
            let acl = parse(&format!("topic read {rule}\n"), "prop")
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let covered = covers(&rule, &sub);
            prop_assert_eq!(covered, acl.can_subscribe(None, "c", &sub));
            if covered {
                for t in universe() {
                    prop_assert!(!topic_matches(&sub, &t) || topic_matches(&rule, &t), "{}", t);
                }
            }
        }

        /// Checks agree with the broker's own matcher, and an allowed subscription never
        /// covers a topic the client may not receive unless a deny carves it out.
        #[test]
        fn agrees_with_naive_matching(
            rules in prop::collection::vec((access(), filter()), 0..6),
            denies in prop::collection::vec(filter(), 0..2),
            sub in filter(),
        ) {
            let mut text: String =
                rules.iter().map(|(a, f)| format!("topic {a} {f}\n")).collect();
            text.extend(denies.iter().map(|f| format!("topic deny {f}\n")));
            let acl = parse(&text, "prop").map_err(|e| TestCaseError::fail(e.to_string()))?;
            let grants = |access: &[&str], t: &str| {
                !denies.iter().any(|d| topic_matches(d, t))
                    && rules.iter().any(|(a, f)| access.contains(a) && topic_matches(f, t))
            };
            let subscribed = acl.can_subscribe(None, "c", &sub);
            for t in universe() {
                prop_assert_eq!(acl.can_receive(None, "c", &t), grants(&["read", "readwrite"], &t));
                prop_assert_eq!(acl.can_publish(None, "c", &t), grants(&["write", "readwrite"], &t));
                if subscribed && topic_matches(&sub, &t) && !denies.iter().any(|d| topic_matches(d, &t)) {
                    prop_assert!(acl.can_receive(None, "c", &t), "{} allowed but not {}", sub, t);
                }
            }
        }
    }
}
