//! The broker-wide directives: authentication (`[auth]`, and per listener with
//! `per_listener_settings`), persistence (`[storage]`), limits (`[limits]`, `[mqtt]`), `$SYS`
//! and logs.
//!
//! Where the two brokers count differently the key is set to what keeps clients working and
//! the difference is said: `message_size_limit` bounds a payload, `limits.max_packet_size` a
//! whole packet, so the limit gets 64 KiB of headroom for topic and properties; Mosquitto's
//! one queue limit becomes both of Tern's (clean sessions in memory, persistent ones on disk).

use super::emit::{self, Table};
use super::listeners::{BrokerWide, Planned};
use super::parse::{Directive, Loc, Report};
use super::{assign, flag, number, text, At, Security, State};

/// Bytes added to `message_size_limit` (a payload) to make `limits.max_packet_size` (a whole
/// packet): the fixed header (at most 5), the topic and the v5 properties. 64 KiB covers a
/// topic of 60,000 bytes or more with ordinary properties.
pub const PACKET_HEADROOM: u64 = 64 * 1024;

/// Tern's largest `limits.max_packet_size`: MQTT's largest packet.
const MAX_PACKET: u64 = 268_435_460;

/// The broker-wide directives as read.
#[derive(Debug, Default)]
pub struct General {
    pub security: Security,
    persistence: At<bool>,
    persistence_location: At<String>,
    max_inflight_messages: At<i64>,
    max_queued_messages: At<i64>,
    max_queued_bytes: At<i64>,
    message_size_limit: At<u64>,
    max_packet_size: At<u64>,
    max_keepalive: At<u32>,
    /// Seconds, and the text written.
    persistent_client_expiration: At<(u64, String)>,
    retain_available: At<bool>,
    sys_interval: At<u64>,
    log_types: Vec<(String, Loc)>,
    log_none: Option<Loc>,
}

/// Directives with no Tern counterpart at all, and why.
fn not_mapped(name: &str) -> Option<&'static str> {
    Some(match name {
        "persistence_file" => "Tern's store is a directory (storage.dir), not a file; mosquitto.db is not read: its retained messages and persistent sessions do not come over",
        "max_inflight_bytes" => "Tern bounds the in-flight window in messages (limits.max_inflight), not bytes",
        "memory_limit" => "Tern has no overall memory cap; its queues are bounded per session (limits.max_queued_*) and persistent ones spill to disk",
        "auth_plugin" | "plugin" | "global_plugin" | "auth_plugin_deny_special_chars" => "Tern loads no Mosquitto plugins; its authentication backends are the password file, JWT ([auth.jwt]) and an HTTP service ([auth.http])",
        "clientid_prefixes" => "no equivalent (Mosquitto deprecates it): restrict client ids with ACL pattern lines (%c)",
        "check_retain_source" => "Tern checks the subscriber's read access to a retained message, not whether its publisher may still write there",
        "log_facility" | "log_timestamp" | "log_timestamp_format" => "Tern's log lines carry an RFC 3339 timestamp and go to standard error (log.format = \"text\" or \"json\"); syslog or journald adds its own",
        "pid_file" => "Tern writes no pid file: run it under systemd (the Debian package's unit) or another supervisor",
        "user" => "Tern does not switch users: start it as the user it should run as (the Debian package runs it as `tern`)",
        "websockets_log_level" | "websockets_headers_size" => "no equivalent: Tern's WebSocket upgrade has fixed limits and logs at info",
        "retry_interval" => "gone from Mosquitto 2.0 too: QoS 1/2 messages are sent again when a client reconnects",
        "psk_file" => "Tern has no TLS-PSK: use certificates, or usernames and passwords over TLS",
        "autosave_interval" | "autosave_on_changes" => "Tern has no periodic save: each change is written to its store before it is acknowledged (storage.durability)",
        "auto_id_prefix" => "Tern makes its own ids for clients that send none (unique per node); their prefix cannot be chosen",
        "allow_duplicate_messages" => "Tern sends a client one copy of a message however many of its subscriptions match",
        _ => return None,
    })
}

/// General directives; false when `d` is not one.
pub fn handle(st: &mut State, d: &Directive) -> bool {
    let name = d.name.as_str();
    if name.starts_with("auth_opt_") || name.starts_with("plugin_opt_") {
        st.not_mapped(
            d,
            "an option of a Mosquitto plugin, which Tern does not load",
        );
        return true;
    }
    match name {
        "password_file" | "acl_file" => {
            if let Some(path) = text(st, d) {
                let slot = security(st, d, |s| {
                    if name == "password_file" {
                        &mut s.password_file
                    } else {
                        &mut s.acl_file
                    }
                });
                if let Some((reports, slot)) = slot {
                    assign(reports, slot, path, d);
                }
            }
        }
        "allow_anonymous" => {
            if let Some(b) = flag(st, d) {
                if let Some((reports, slot)) = security(st, d, |s| &mut s.allow_anonymous) {
                    assign(reports, slot, b, d);
                }
            }
        }
        "allow_zero_length_clientid" => match flag(st, d) {
            Some(true) => st.equivalent(d, "Tern assigns an id to a v5 client or a 3.1.1 clean-session client that sends none"),
            Some(false) => st.not_mapped(d, "Tern always assigns an id to a v5 client or a 3.1.1 clean-session client that sends none (3.1.1 with clean session 0 is refused, as the spec says)"),
            None => {}
        },
        "persistence" | "retained_persistence" => {
            if let Some(b) = flag(st, d) {
                assign(&mut st.not_mapped, &mut st.general.persistence, b, d);
            }
        }
        "persistence_location" => {
            if let Some(p) = text(st, d) {
                assign(&mut st.not_mapped, &mut st.general.persistence_location, p, d);
            }
        }
        "max_inflight_messages" => {
            if let Some(n) = number(st, d) {
                assign(&mut st.not_mapped, &mut st.general.max_inflight_messages, n, d);
            }
        }
        "max_queued_messages" => {
            if let Some(n) = number(st, d) {
                assign(&mut st.not_mapped, &mut st.general.max_queued_messages, n, d);
            }
        }
        "max_queued_bytes" => {
            if let Some(n) = number(st, d) {
                assign(&mut st.not_mapped, &mut st.general.max_queued_bytes, n, d);
            }
        }
        "message_size_limit" => {
            if let Some(n) = number(st, d) {
                assign(&mut st.not_mapped, &mut st.general.message_size_limit, n, d);
            }
        }
        "max_packet_size" => {
            if let Some(n) = number(st, d) {
                assign(&mut st.not_mapped, &mut st.general.max_packet_size, n, d);
            }
        }
        "max_keepalive" => {
            if let Some(n) = number::<u32>(st, d) {
                if n > 65_535 {
                    st.not_mapped(d, "at most 65535 seconds");
                } else {
                    assign(&mut st.not_mapped, &mut st.general.max_keepalive, n, d);
                }
            }
        }
        "persistent_client_expiration" => match expiration(d.args.first().map(String::as_str)) {
            Some(secs) if d.args.len() == 1 => assign(
                &mut st.not_mapped,
                &mut st.general.persistent_client_expiration,
                (secs, d.rest.clone()),
                d,
            ),
            _ => st.not_mapped(d, "expects a number and a unit h, d, w, m (month) or y"),
        },
        "retain_available" => {
            if let Some(b) = flag(st, d) {
                assign(&mut st.not_mapped, &mut st.general.retain_available, b, d);
            }
        }
        "sys_interval" => {
            if let Some(n) = number(st, d) {
                assign(&mut st.not_mapped, &mut st.general.sys_interval, n, d);
            }
        }
        "log_type" => {
            for t in d.args.clone() {
                match t.as_str() {
                    "debug" | "error" | "warning" | "notice" | "information" | "all" | "none" => {
                        st.general.log_types.push((t, d.at.clone()))
                    }
                    "subscribe" | "unsubscribe" => st.not_mapped(d, format!("{t}: Tern does not log each subscription; `tern ctl trace` follows a client's or a topic's traffic live")),
                    "websockets" => st.not_mapped(d, "websockets: Tern logs failed WebSocket upgrades at info"),
                    other => st.not_mapped(d, format!("unknown log type {other:?}")),
                }
            }
        }
        "log_dest" => log_dest(st, d),
        "connection_messages" => match flag(st, d) {
            Some(true) => st.equivalent(d, "Tern logs each connect and disconnect at info"),
            Some(false) => st.not_mapped(d, "Tern logs connects and disconnects at info: a log.level of warn hides them, with the other info lines"),
            None => {}
        },
        "set_tcp_nodelay" => match flag(st, d) {
            Some(true) => st.equivalent(d, "Tern always sets TCP_NODELAY on client sockets"),
            Some(false) => st.not_mapped(d, "Tern always sets TCP_NODELAY on client sockets; it cannot be turned off"),
            None => {}
        },
        "upgrade_outgoing_qos" => match flag(st, d) {
            Some(false) => st.equivalent(d, "Tern delivers at the lower of the message's and the subscription's QoS, as the spec says"),
            Some(true) => st.not_mapped(d, "Tern never upgrades a message's QoS to the subscription's (the spec forbids it)"),
            None => {}
        },
        "queue_qos0_messages" => match flag(st, d) {
            Some(false) => st.equivalent(d, "Tern keeps only QoS 1/2 messages for an offline session"),
            Some(true) => st.not_mapped(d, "Tern keeps only QoS 1/2 messages for an offline session, as the spec says; publish at QoS 1 what must wait"),
            None => {}
        },
        name => match not_mapped(name) {
            Some(why) => {
                if matches!(name, "psk_file" | "auth_plugin" | "auto_id_prefix") && st.per_listener() {
                    st.listener_mut(d.scope).touched = true;
                }
                st.not_mapped(d, why)
            }
            None => return false,
        },
    }
    true
}

/// The security options `d` sets: the current listener's with `per_listener_settings true`
/// (marking it configured), the broker's otherwise. Returns the report list with the slot.
fn security<'a, T>(
    st: &'a mut State,
    d: &Directive,
    field: impl FnOnce(&mut Security) -> &mut At<T>,
) -> Option<(&'a mut Vec<Report>, &'a mut At<T>)> {
    if st.per_listener() {
        let scope = d.scope;
        let at = d.at.clone();
        // Split borrows: the listener and the report list are different fields of `st`.
        let State {
            listeners,
            cursors,
            not_mapped,
            ..
        } = st;
        let l = match cursors.get(&scope).and_then(|c| c.listener) {
            Some(i) => listeners.explicit.get_mut(i)?,
            None => &mut listeners.default,
        };
        l.touched = true;
        if l.at.is_none() {
            l.at = Some(at);
        }
        Some((not_mapped, field(&mut l.security)))
    } else {
        Some((&mut st.not_mapped, field(&mut st.general.security)))
    }
}

/// `persistent_client_expiration`'s value in seconds: a number and h, d, w, m (a month of 30
/// days) or y (365 days).
fn expiration(v: Option<&str>) -> Option<u64> {
    let v = v?;
    let unit = match v.chars().last()? {
        'h' => 3600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        'm' => 30 * 86_400,
        'y' => 365 * 86_400,
        _ => return None,
    };
    let n: u64 = v[..v.len() - 1].parse().ok()?;
    (n > 0).then(|| n.saturating_mul(unit))
}

fn log_dest(st: &mut State, d: &Directive) {
    match d.args.first().map(String::as_str) {
        Some("stderr") => st.equivalent(d, "Tern logs to standard error"),
        Some("stdout") => st.not_mapped(d, "Tern logs to standard error (its standard output carries only the ready line): redirect 2>&1 if one stream is wanted"),
        Some("file") => st.not_mapped(d, format!("Tern logs to standard error, not to a file: under systemd the journal keeps it; otherwise redirect it (2>>{})", d.args.get(1).map_or("FILE", String::as_str))),
        Some("syslog") => st.not_mapped(d, "Tern logs to standard error, which systemd's journal (and from it syslog) collects"),
        Some("topic") => st.not_mapped(d, "Tern publishes no log lines under $SYS/broker/log: read the log, the metrics or `tern ctl trace`"),
        Some("dlt") => st.not_mapped(d, "Tern has no DLT output"),
        Some("none") => {
            st.general.log_none = Some(d.at.clone());
        }
        _ => st.not_mapped(d, format!("unknown log destination {:?}", d.rest)),
    }
}

/// `[auth]`, and the per-listener authentication in the listeners' auth tables. Returns the
/// table and the ACL file in force (the bridges' note needs it).
pub fn auth(st: &mut State, planned: &mut [Planned]) -> (Table, Option<String>) {
    let mut t = Table::new("[auth]");
    if !st.per_listener() {
        let s = std::mem::take(&mut st.general.security);
        match (&s.allow_anonymous, st.local_only) {
            (_, true) => {
                t.set("allow_anonymous", emit::boolean(true), "local only mode: Mosquitto 2 allows anonymous clients on its loopback listener");
                if let Some((false, a)) = &s.allow_anonymous {
                    st.not_mapped.push(Report {
                        at: a.clone(),
                        directive: "allow_anonymous".into(),
                        why: "Mosquitto ignores it in local only mode (no listener configured) and allows anonymous clients".into(),
                    });
                }
            }
            (Some((b, a)), false) => t.set("allow_anonymous", emit::boolean(*b), a.to_string()),
            (None, false) => t.set(
                "allow_anonymous",
                emit::boolean(false),
                "Mosquitto 2's default",
            ),
        }
        if let Some((p, a)) = &s.password_file {
            t.set(
                "password_file",
                emit::string(p),
                format!("{a}: the file works unchanged"),
            );
        }
        if let Some((p, a)) = &s.acl_file {
            t.set(
                "acl_file",
                emit::string(p),
                format!("{a}: the file works unchanged"),
            );
        }
        return (t, s.acl_file.map(|(p, _)| p));
    }
    // Per listener: Tern has one password file and one ACL file; each listener says whether
    // it uses the password file (its chain) and whether anonymous clients may connect.
    let password = one_file(st, planned, |s| &s.password_file, "password_file", "Tern reads one password file ([auth] password_file); this listener's differs: merge its users into that file (usernames must be unique)");
    let acl = one_file(st, planned, |s| &s.acl_file, "acl_file", "Tern reads one ACL file ([auth] acl_file); this listener's differs: merge its rules into that file");
    if let Some((p, a)) = &password {
        t.set(
            "password_file",
            emit::string(p),
            format!("{a}: the file works unchanged"),
        );
    }
    if let Some((p, a)) = &acl {
        t.set(
            "acl_file",
            emit::string(p),
            format!("{a}: the file works unchanged; per_listener_settings: see each listener"),
        );
        for p in planned.iter() {
            if p.security.acl_file.is_none() {
                st.not_mapped.push(Report {
                    at: p.at.clone().unwrap_or_else(|| a.clone()),
                    directive: "acl_file".into(),
                    why: format!("listener {} has no ACL on Mosquitto (everything allowed); Tern's ACL file applies to every listener: give its users rules there", p.name),
                });
            }
        }
    }
    for p in planned.iter_mut() {
        let (anon, comment) = match &p.security.allow_anonymous {
            Some((b, a)) => (*b, a.to_string()),
            None => (false, "Mosquitto 2's default".to_string()),
        };
        p.auth.set("allow_anonymous", emit::boolean(anon), comment);
        match &p.security.password_file {
            Some((_, a)) => p
                .auth
                .set("chain", emit::strings(&["password_file"]), a.to_string()),
            None => p.auth.set(
                "chain",
                emit::strings(&[]),
                "no password_file on this listener",
            ),
        }
    }
    (t, acl.map(|(p, _)| p))
}

/// The one file of a kind the listeners use (the first), each other one reported.
fn one_file(
    st: &mut State,
    planned: &[Planned],
    field: impl Fn(&Security) -> &At<String>,
    directive: &str,
    why: &str,
) -> Option<(String, Loc)> {
    let mut chosen: Option<(String, Loc)> = None;
    for p in planned {
        if let Some((f, a)) = field(&p.security) {
            match &chosen {
                None => chosen = Some((f.clone(), a.clone())),
                Some((c, _)) if c == f => {}
                Some(_) => st.not_mapped.push(Report {
                    at: a.clone(),
                    directive: directive.into(),
                    why: why.into(),
                }),
            }
        }
    }
    chosen
}

/// `[limits]`, `[mqtt]` (with the broker-wide keys taken from the listeners), `[storage]`,
/// `[sys_topics]` and `[log]`.
pub fn tables(st: &mut State, wide: BrokerWide) -> Vec<Table> {
    let g = std::mem::take(&mut st.general);
    let mut reports = Vec::new();
    let mut report = |at: &Loc, directive: &str, why: String| {
        reports.push(Report {
            at: at.clone(),
            directive: directive.into(),
            why,
        })
    };
    let mut limits = Table::new("[limits]");
    if let Some((n, a)) = &g.max_inflight_messages {
        match *n {
            n if n <= 0 => limits.set(
                "max_inflight",
                "65535".into(),
                format!("{a}: 0 = no maximum on Mosquitto; 65535 is Tern's largest window"),
            ),
            n => limits.set("max_inflight", n.min(65_535).to_string(), a.to_string()),
        }
    }
    if let Some((n, a)) = &g.max_queued_messages {
        if *n > 0 {
            limits.set(
                "max_queued_messages",
                n.to_string(),
                format!("{a}: clean sessions, in memory"),
            );
            limits.set(
                "max_queued_messages_persistent",
                n.to_string(),
                format!("{a}: persistent sessions, on disk beyond 256 (Tern's default: 100000)"),
            );
        } else {
            report(a, "max_queued_messages", "0 = no maximum on Mosquitto; Tern always bounds queues: its defaults apply (1000 messages in memory for a clean session, 100000 on disk for a persistent one)".into());
        }
    }
    if let Some((n, a)) = &g.max_queued_bytes {
        if *n > 0 {
            limits.set(
                "max_queued_bytes",
                n.to_string(),
                format!("{a}: Tern counts payload plus topic"),
            );
            limits.set("max_queued_bytes_persistent", n.to_string(), a.to_string());
        } else {
            report(a, "max_queued_bytes", "0 = no maximum on Mosquitto; Tern always bounds queues: its defaults apply (16 MiB in memory for a clean session, 1 GiB on disk for a persistent one)".into());
        }
    }
    packet_size(&g, &mut limits, &mut report);
    for (k, v, c) in wide.limits {
        limits.set(k, v, c);
    }
    if let Some((n, a)) = &g.max_keepalive {
        limits.set("max_keepalive", n.to_string(), a.to_string());
    }
    if let Some(((secs, written), a)) = &g.persistent_client_expiration {
        let secs = (*secs).min(u64::from(u32::MAX));
        let value = crate::config::duration::display(std::time::Duration::from_secs(secs));
        limits.set(
            "max_session_expiry",
            emit::string(&value),
            format!("{a}: {written} (Mosquitto's m is a 30-day month, Tern's a minute); caps v5 sessions' own expiry too"),
        );
    }
    let mut mqtt = Table::new("[mqtt]");
    if let Some((b, a)) = &g.retain_available {
        mqtt.set("retain_available", emit::boolean(*b), a.to_string());
    }
    for (k, v, c) in wide.mqtt {
        mqtt.set(k, v, c);
    }
    let mut storage = Table::new("[storage]");
    match &g.persistence {
        Some((true, a)) => {
            storage.set("durability", emit::string("os"), format!("{a}: each change written before it is acknowledged (Mosquitto saved every autosave_interval)"));
            if let Some((loc, la)) = &g.persistence_location {
                let dir = std::path::Path::new(loc).join("tern");
                storage.set("dir", emit::string(&dir.display().to_string()), format!("{la}: a directory of Tern's own beside mosquitto.db, which is not read"));
            }
        }
        Some((false, a)) => {
            storage.set("durability", emit::string("memory"), format!("{a}: nothing kept across a restart"));
        }
        None => storage.set("durability", emit::string("memory"), "Mosquitto's default (persistence false): nothing kept across a restart; \"os\" keeps sessions, queues and retained messages"),
    }
    if let (Some((_, la)), false) = (
        &g.persistence_location,
        g.persistence.as_ref().is_some_and(|p| p.0),
    ) {
        report(
            la,
            "persistence_location",
            "persistence is off, so there is nothing to keep there".into(),
        );
    }
    let mut sys = Table::new("[sys_topics]");
    if let Some((n, a)) = &g.sys_interval {
        if *n > 86_400 {
            sys.set(
                "interval",
                "86400".into(),
                format!("{a}: Tern's longest interval"),
            );
            report(
                a,
                "sys_interval",
                format!("{n} s is beyond Tern's longest interval: 86400 s (a day)"),
            );
        } else {
            sys.set("interval", n.to_string(), a.to_string());
        }
    }
    let mut log = Table::new("[log]");
    if let Some(a) = &g.log_none {
        log.set("level", emit::string("off"), format!("{a}: log_dest none"));
    } else if !g.log_types.is_empty() {
        let rank = |t: &str| match t {
            "none" => 0,
            "error" => 1,
            "warning" => 2,
            "notice" | "information" => 3,
            _ => 4, // debug, all
        };
        let top = g.log_types.iter().map(|(t, _)| rank(t)).max().unwrap_or(3);
        let level = ["off", "error", "warn", "info", "debug"][top];
        let mut lines: Vec<Loc> = g.log_types.iter().map(|(_, a)| a.clone()).collect();
        lines.dedup();
        log.set(
            "level",
            emit::string(level),
            format!("{}: log_type, the most verbose one", super::locs(&lines)),
        );
    }
    st.not_mapped.append(&mut reports);
    vec![limits, mqtt, storage, sys, log]
}

/// `limits.max_packet_size` from `max_packet_size` (the whole packet, as in Tern) and
/// `message_size_limit` (the payload: plus headroom), the lower of the two.
fn packet_size(g: &General, limits: &mut Table, report: &mut impl FnMut(&Loc, &str, String)) {
    let mut candidates: Vec<(u64, String)> = Vec::new();
    if let Some((n, a)) = &g.max_packet_size {
        match *n {
            0 => report(a, "max_packet_size", "0 = no limit on Mosquitto; Tern's limits.max_packet_size (1 MiB by default, at most 268435460) applies".into()),
            n if n < 64 => {
                candidates.push((64, format!("{a}: raised to Tern's smallest, 64")));
                report(a, "max_packet_size", format!("{n} is below Tern's smallest limit: 64 bytes"));
            }
            n => candidates.push((n.min(MAX_PACKET), a.to_string())),
        }
    }
    if let Some((n, a)) = &g.message_size_limit {
        if *n == 0 {
            report(a, "message_size_limit", "0 = no limit on Mosquitto; Tern's limits.max_packet_size (1 MiB by default, at most 268435460) applies".into());
        } else {
            let packet = n.saturating_add(PACKET_HEADROOM).min(MAX_PACKET);
            candidates.push((
                packet,
                format!("{a}: message_size_limit {n} + 64 KiB for topic and properties"),
            ));
            report(a, "message_size_limit", format!(
                "mapped to limits.max_packet_size = {packet}: Mosquitto limits the payload, Tern the whole packet, so 64 KiB of headroom is added for the topic and properties; a payload a little over {n} bytes now passes, and a larger packet disconnects its publisher (v5 DISCONNECT 0x95) where Mosquitto dropped the message and completed its QoS flow"
            ));
        }
    }
    if let Some((n, c)) = candidates.into_iter().min_by_key(|(n, _)| *n) {
        limits.set("max_packet_size", n.to_string(), c);
    }
}
