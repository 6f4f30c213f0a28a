//! Mosquitto's bridges (`connection NAME` and the lines after it) as `[[bridges]]`.
//!
//! A `topic PATTERN [out|in|both] [QOS] [LOCAL_PREFIX REMOTE_PREFIX]` line becomes one rule
//! per direction. Mosquitto subscribes locally to `LOCAL_PREFIX + PATTERN` for `out` and at
//! the remote to `REMOTE_PREFIX + PATTERN` for `in`, and swaps the prefixes on the way; a Tern
//! rule's `filter` is that full filter on the side messages come from, with the same prefix
//! swap, so the topics on either side stay what they were. Mosquitto's defaults are written
//! out where Tern's differ: direction `out`, QoS 0, MQTT 3.1.1, client id `NAME.HOSTNAME`.
//!
//! Tern keeps the remote's password out of the configuration (`secret_file`). With `-o` the
//! migration writes it to `bridge-NAME.secret` beside the output, mode 0600; on standard
//! output it cannot, and says where it must go.

use super::emit::{self, Table};
use super::parse::{Directive, Loc, Report};
use super::{assign, At, Options, Secret, State};
use crate::protocol::validate::is_valid_topic_filter;

#[derive(Debug, Clone)]
struct Rule {
    filter: String,
    qos: u8,
    local_prefix: String,
    remote_prefix: String,
}

/// One `connection` section as read.
#[derive(Debug)]
pub struct Bridge {
    at: Loc,
    name: String,
    addresses: At<Vec<String>>,
    out: Vec<Rule>,
    inbound: Vec<Rule>,
    client_id: At<String>,
    username: At<String>,
    password: At<String>,
    protocol: At<&'static str>,
    ca: At<String>,
    cert: At<String>,
    key: At<String>,
    capath: Option<Loc>,
    keep_alive: At<u64>,
    notifications: bool,
}

/// Bridge directives with no Tern counterpart, and why.
fn not_mapped(name: &str) -> Option<&'static str> {
    Some(match name {
        "bridge_insecure" => "Tern always checks that the remote's certificate names the host it connects to; if it names another, set tls.server_name to that name",
        "bridge_tls_version" => "Tern's bridges speak TLS 1.2 and 1.3 (rustls), whichever the remote prefers",
        "bridge_alpn" => "Tern's bridge sends no ALPN protocol",
        "bridge_identity" | "bridge_psk" => "Tern has no TLS-PSK: use certificates (tls.ca, tls.cert, tls.key)",
        "bridge_require_ocsp" => "Tern's bridge does not ask for OCSP stapling",
        "bridge_bind_address" => "Tern's bridge connects from the address the system chooses",
        "bridge_attempt_unsubscribe" => "Tern's bridge subscribes only to its in rules' filters and sends no UNSUBSCRIBE",
        "bridge_max_packet_size" => "Tern's bridge respects the remote's v5 Maximum Packet Size (a larger message is dropped and counted as refused); it has no limit of its own",
        "bridge_outgoing_retain" => "Tern's bridge keeps RETAIN unless a v5 remote says Retain Available 0",
        "local_clientid" | "local_username" | "local_password" => "Tern's bridge is part of the broker, not a local client: what it brings in is checked against the ACL as user bridge:NAME (docs/bridges.md, ACL)",
        "local_cleansession" => "Tern's bridge queue is durable on this side whatever the remote session is",
        "notification_topic" | "notifications_local_only" => "Tern publishes no bridge state messages: watch tern_bridge_connected{bridge=\"NAME\"} instead",
        "restart_timeout" => "Tern's bridge reconnects after a random delay under a cap that doubles from 0.5 s to 30 s",
        "round_robin" => "Tern's bridge has one address",
        "start_type" | "threshold" | "idle_timeout" => "Tern starts every bridge with the broker and keeps it connected (Mosquitto's automatic start type)",
        _ => return None,
    })
}

/// Whether `name` is a directive that belongs to a bridge section.
fn is_bridge_directive(name: &str) -> bool {
    not_mapped(name).is_some()
        || matches!(
            name,
            "address"
                | "addresses"
                | "topic"
                | "clientid"
                | "remote_clientid"
                | "username"
                | "remote_username"
                | "password"
                | "remote_password"
                | "bridge_protocol_version"
                | "bridge_cafile"
                | "bridge_certfile"
                | "bridge_keyfile"
                | "bridge_capath"
                | "cleansession"
                | "keepalive_interval"
                | "try_private"
                | "notifications"
        )
}

/// Bridge directives; false when `d` is not one.
pub fn handle(st: &mut State, d: &Directive) -> bool {
    if d.name == "connection" {
        match d.args.as_slice() {
            [name] => {
                st.bridges.push(Bridge {
                    at: d.at.clone(),
                    name: name.clone(),
                    addresses: None,
                    out: Vec::new(),
                    inbound: Vec::new(),
                    client_id: None,
                    username: None,
                    password: None,
                    protocol: None,
                    ca: None,
                    cert: None,
                    key: None,
                    capath: None,
                    keep_alive: None,
                    notifications: true,
                });
                let i = st.bridges.len() - 1;
                st.cursor(d.scope).bridge = Some(i);
            }
            _ => st.not_mapped(d, "expects one name"),
        }
        return true;
    }
    if !is_bridge_directive(&d.name) {
        return false;
    }
    let Some(i) = st.cursor(d.scope).bridge else {
        st.not_mapped(
            d,
            "a bridge option outside a `connection` section (Mosquitto refuses it too)",
        );
        return true;
    };
    if let Some(why) = not_mapped(&d.name) {
        st.not_mapped(d, why);
        return true;
    }
    let mut reports = std::mem::take(&mut st.not_mapped);
    let mut equivalent = Vec::new();
    let Some(b) = st.bridges.get_mut(i) else {
        st.not_mapped = reports;
        return true;
    };
    match d.name.as_str() {
        "address" | "addresses" => {
            if d.args.is_empty() {
                reports.push(Report::new(d, "expects host[:port]"));
            } else {
                let list = d.args.clone();
                assign(&mut reports, &mut b.addresses, list, d);
            }
        }
        "topic" => topic(b, d, &mut reports),
        "clientid" | "remote_clientid" | "username" | "remote_username" | "password"
        | "remote_password" | "bridge_cafile" | "bridge_certfile" | "bridge_keyfile" => {
            if d.rest.is_empty() {
                reports.push(Report::new(d, "expects a value"));
            } else {
                let slot = match d.name.as_str() {
                    "clientid" | "remote_clientid" => &mut b.client_id,
                    "username" | "remote_username" => &mut b.username,
                    "password" | "remote_password" => &mut b.password,
                    "bridge_cafile" => &mut b.ca,
                    "bridge_certfile" => &mut b.cert,
                    _ => &mut b.key,
                };
                assign(&mut reports, slot, d.rest.clone(), d);
            }
        }
        "bridge_protocol_version" => match d.args.first().map(String::as_str) {
            Some("mqttv311") => assign(&mut reports, &mut b.protocol, "3.1.1", d),
            Some("mqttv50") => assign(&mut reports, &mut b.protocol, "5", d),
            Some("mqttv31") => {
                assign(&mut reports, &mut b.protocol, "3.1.1", d);
                reports.push(Report::new(
                    d,
                    "Tern's bridges speak MQTT 3.1.1 or 5, not 3.1: written as 3.1.1; check that the remote accepts it",
                ));
            }
            _ => reports.push(Report::new(d, "expects mqttv31, mqttv311 or mqttv50")),
        },
        "cleansession" => match d.args.first().map(String::as_str) {
            Some("false") => equivalent.push(Report::new(d, "Tern's bridge keeps its session at the remote (3.1.1: clean session 0; v5: one day's expiry)")),
            Some("true") => reports.push(Report::new(d, "Tern's bridge always keeps its session at the remote (3.1.1: clean session 0; v5: one day's expiry), so the remote holds messages while the link is down")),
            _ => reports.push(Report::new(d, "expects true or false")),
        },
        "try_private" => match d.args.first().map(String::as_str) {
            Some("false") => equivalent.push(Report::new(d, "Tern's bridge connects as an ordinary client")),
            _ => reports.push(Report::new(d, "Tern's bridge connects as an ordinary client (no bridge flag in CONNECT); it avoids loops with No Local (v5) and an echo filter (3.1.1) instead")),
        },
        "notifications" => match d.args.first().map(String::as_str) {
            Some("false") => {
                b.notifications = false;
                equivalent.push(Report::new(d, "Tern publishes no bridge state messages"));
            }
            _ => reports.push(Report::new(d, "Tern publishes no bridge state messages on $SYS/broker/connection/…/state: watch tern_bridge_connected{bridge=\"NAME\"} instead")),
        },
        "bridge_capath" => b.capath = Some(d.at.clone()),
        "keepalive_interval" => match d.args.first().map(|a| a.parse::<u64>()) {
            Some(Ok(n)) if n <= 65_535 => assign(&mut reports, &mut b.keep_alive, n, d),
            _ => reports.push(Report::new(d, "expects a number of seconds, at most 65535")),
        },
        _ => reports.push(Report::new(d, "not a bridge directive tern migrate knows")),
    }
    st.not_mapped = reports;
    st.equivalent.append(&mut equivalent);
    true
}

/// `topic PATTERN [out|in|both] [QOS] [LOCAL_PREFIX REMOTE_PREFIX]`.
fn topic(b: &mut Bridge, d: &Directive, reports: &mut Vec<Report>) {
    let word = |i: usize| -> Option<String> {
        d.args.get(i).map(|w| {
            if w == "\"\"" {
                String::new()
            } else {
                w.clone()
            }
        })
    };
    if d.args.is_empty() || d.args.len() == 4 || d.args.len() > 5 {
        reports.push(Report::new(
            d,
            "expects PATTERN [out|in|both [QOS [LOCAL_PREFIX REMOTE_PREFIX]]]",
        ));
        return;
    }
    let pattern = word(0).unwrap_or_default();
    let direction = d
        .args
        .get(1)
        .map_or("out".to_string(), |s| s.to_ascii_lowercase());
    let qos = match d.args.get(2).map(|q| q.parse::<u8>()) {
        None => 0,
        Some(Ok(q)) if q <= 2 => q,
        _ => {
            reports.push(Report::new(d, "the QoS is 0, 1 or 2"));
            return;
        }
    };
    let local = word(3).unwrap_or_default();
    let remote = word(4).unwrap_or_default();
    if pattern.is_empty() && (local.is_empty() || remote.is_empty()) {
        reports.push(Report::new(
            d,
            "an empty pattern needs both prefixes (Mosquitto refuses it too)",
        ));
        return;
    }
    let dirs: &[bool] = match direction.as_str() {
        "out" => &[true],
        "in" => &[false],
        "both" => &[true, false],
        _ => {
            reports.push(Report::new(
                d,
                format!("the direction is out, in or both, not {direction:?}"),
            ));
            return;
        }
    };
    let prefix_ok = |p: &str| !p.contains(['+', '#']) && !p.starts_with('$');
    for &out in dirs {
        let filter = format!("{}{pattern}", if out { &local } else { &remote });
        if !is_valid_topic_filter(&filter)
            || filter.starts_with('$')
            || !prefix_ok(&local)
            || !prefix_ok(&remote)
        {
            reports.push(Report::new(d, format!(
                "{} rule on {filter:?}: Tern's bridges carry application topics only (no $ topics such as $SYS, no wildcards in prefixes)",
                if out { "out" } else { "in" }
            )));
            continue;
        }
        let rule = Rule {
            filter,
            qos,
            local_prefix: local.clone(),
            remote_prefix: remote.clone(),
        };
        if out {
            b.out.push(rule);
        } else {
            b.inbound.push(rule);
        }
    }
}

/// A Tern bridge name from a Mosquitto connection name: letters, digits, `-`, `_`, `.`, at
/// most 64.
fn tern_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if cleaned.is_empty() {
        "bridge".into()
    } else {
        cleaned
    }
}

/// Mosquitto's `host[:port]` (port 1883 when absent; an IPv6 address needs one) as Tern's
/// `host:port` (`[::1]:1883` for IPv6).
fn address(a: &str) -> Option<String> {
    let port_of = |p: &str| p.parse::<u16>().ok().filter(|&p| p > 0);
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        // `[::1]` or `[::1]:1884`, as people write IPv6 addresses elsewhere.
        let (h, after) = rest.split_once(']')?;
        match after.strip_prefix(':') {
            Some(p) => (h, port_of(p)?),
            None if after.is_empty() => (h, 1883),
            None => return None,
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, port_of(p)?),
            None => (a, 1883),
        }
    };
    if host.is_empty() {
        return None;
    }
    Some(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

fn rules(rules: &[Rule]) -> String {
    let mut s = String::from("[\n");
    for r in rules {
        s.push_str(&format!(
            "  {{ filter = {}, qos = {}, local_prefix = {}, remote_prefix = {} }},\n",
            emit::string(&r.filter),
            r.qos,
            emit::string(&r.local_prefix),
            emit::string(&r.remote_prefix)
        ));
    }
    s.push(']');
    s
}

/// The `[[bridges]]` tables and the password files to write. `acl_file`: the ACL in force,
/// which the messages a bridge brings in must pass as user `bridge:NAME`.
pub fn tables(st: &mut State, opts: &Options, acl_file: Option<&str>) -> (Vec<Table>, Vec<Secret>) {
    let bridges = std::mem::take(&mut st.bridges);
    let mut out = Vec::new();
    let mut secrets = Vec::new();
    let mut names = std::collections::HashSet::new();
    for b in bridges {
        let mut report = |at: &Loc, directive: &str, why: String| {
            st.not_mapped.push(Report {
                at: at.clone(),
                directive: directive.into(),
                why,
            })
        };
        let mut name = tern_name(&b.name);
        while !names.insert(name.clone()) {
            name.push('_');
        }
        if name != b.name {
            report(&b.at, "connection", format!("{:?} is not a Tern bridge name (1 to 64 letters, digits, -, _, .): named {name:?}", b.name));
        }
        let Some((addresses, addr_at)) = &b.addresses else {
            report(
                &b.at,
                "connection",
                "no address: this bridge is left out (Mosquitto refuses it too)".into(),
            );
            continue;
        };
        let Some(addr) = addresses.first().and_then(|a| address(a)) else {
            report(
                addr_at,
                "address",
                format!(
                    "{:?} is not host[:port]: this bridge is left out",
                    addresses.first().map_or("", String::as_str)
                ),
            );
            continue;
        };
        if addresses.len() > 1 {
            report(
                addr_at,
                "address",
                format!(
                    "Tern's bridge has one address: {addr} is used, {} not",
                    addresses[1..].join(" ")
                ),
            );
        }
        if b.out.is_empty() && b.inbound.is_empty() {
            report(
                &b.at,
                "connection",
                "no topic rule Tern can carry: this bridge is left out".into(),
            );
            continue;
        }
        // TLS: only with a CA file; a bridge configured for TLS is never written as plain TCP.
        let tls = match (&b.ca, &b.capath, &b.cert) {
            (Some(_), _, _) => true,
            (None, Some(a), _) => {
                report(a, "bridge_capath", "Tern needs the remote's CA in one PEM file (tls.ca): this bridge is left out rather than connected without TLS; concatenate the directory's certificates and set tls.ca".into());
                continue;
            }
            (None, None, Some((_, a))) => {
                report(a, "bridge_certfile", "needs bridge_cafile (Mosquitto refuses it too): this bridge is left out rather than connected without TLS".into());
                continue;
            }
            (None, None, None) => false,
        };
        let mut t = Table::new("[[bridges]]");
        if b.notifications {
            t.note(format!(
                "Bridge {name:?}: Mosquitto published its state on $SYS/broker/connection/CLIENT_ID/state (notifications);\nTern has the metric tern_bridge_connected{{bridge={name:?}}} instead."
            ));
        }
        t.set("name", emit::string(&name), b.at.to_string());
        t.set("address", emit::string(&addr), addr_at.to_string());
        match &b.protocol {
            Some((p, a)) => t.set("protocol", emit::string(p), a.to_string()),
            None => t.set(
                "protocol",
                emit::string("3.1.1"),
                "Mosquitto's default bridge_protocol_version (Tern's: \"5\")",
            ),
        }
        match (&b.client_id, &opts.hostname) {
            (Some((c, a)), _) => t.set("client_id", emit::string(c), a.to_string()),
            (None, Some(host)) => t.set(
                "client_id",
                emit::string(&format!("{}.{host}", b.name)),
                "Mosquitto's default remote_clientid, NAME.HOSTNAME (this host's name when migrating)",
            ),
            (None, None) => report(&b.at, "remote_clientid", "Mosquitto's default client id is NAME.HOSTNAME and this host's name is unknown: Tern's default tern-bridge-NAME is used; set client_id if the remote knows the old one".into()),
        }
        if let Some((u, a)) = &b.username {
            t.set("username", emit::string(u), a.to_string());
        }
        if let Some((pw, a)) = &b.password {
            let file = format!("bridge-{name}.secret");
            match &opts.secret_dir {
                Some(dir) => {
                    let path = dir.join(&file);
                    t.set(
                        "secret_file",
                        emit::string(&path.display().to_string()),
                        format!("{a}: remote_password, written to this file (mode 0600)"),
                    );
                    secrets.push(Secret {
                        path,
                        password: pw.clone(),
                    });
                }
                None => {
                    t.set(
                        "secret_file",
                        emit::string(&file),
                        format!("{a}: remote_password: write it to this file"),
                    );
                    report(a, "remote_password", format!("Tern reads the password from a file (secret_file), and the output went to standard output, so it was not written: put it alone in {file} (mode 0600) where Tern runs, or run tern migrate again with -o"));
                }
            }
        }
        if tls {
            let mut parts = Vec::new();
            let mut lines = Vec::new();
            for (key, v) in [("ca", &b.ca), ("cert", &b.cert), ("key", &b.key)] {
                if let Some((p, a)) = v {
                    parts.push(format!("{key} = {}", emit::string(p)));
                    lines.push(a.clone());
                }
            }
            t.set(
                "tls",
                format!("{{ {} }}", parts.join(", ")),
                super::locs(&lines),
            );
            if let Some(a) = &b.capath {
                report(
                    a,
                    "bridge_capath",
                    "Tern reads one CA file: bridge_cafile is used, this directory is not".into(),
                );
            }
        }
        if let Some((k, a)) = &b.keep_alive {
            t.set("keep_alive", k.to_string(), a.to_string());
        }
        if !b.out.is_empty() {
            t.set("out", rules(&b.out), "");
        }
        if !b.inbound.is_empty() {
            t.set("in", rules(&b.inbound), "");
            if let Some(acl) = acl_file {
                let mut grant = vec![format!("`user bridge:{name}`")];
                for r in &b.inbound {
                    let rest = r.filter.strip_prefix(&r.remote_prefix).unwrap_or(&r.filter);
                    grant.push(format!("`topic write {}{rest}`", r.local_prefix));
                }
                report(&b.at, "connection", format!("Tern checks what this bridge brings in against the ACL as user bridge:{name} (Mosquitto let a bridge's messages through): unless {acl} grants it already, add the lines {}, or those messages are dropped (counted as not_authorized)", grant.join(", ")));
            }
        }
        out.push(t);
    }
    (out, secrets)
}
