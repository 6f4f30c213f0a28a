//! Mosquitto's listeners as Tern's named listeners (`[listeners.NAME]`).
//!
//! Mosquitto has a *default listener*, configured by `port`, `bind_address` and any listener
//! option written before the first `listener` line, and started only when one of those is
//! set; then each `listener PORT [ADDRESS]` starts one more, and the options after it are its
//! own. Without any of them Mosquitto 2 runs in "local only mode": port 1883 on the loopback
//! interface, anonymous clients allowed. The kind follows from the options: `protocol
//! websockets` makes `ws`, `certfile`/`keyfile` make `tls` (or `wss`). Names: the first
//! listener of each kind is named after it (`tcp`, `tls`, `ws`, `wss`), the next ones after
//! kind and port (`tcp_1884`).
//!
//! Mosquitto's Maximum QoS and topic alias limit are set per listener; Tern's are
//! broker-wide (`mqtt.max_qos`, `mqtt.topic_alias_maximum`), so they are carried over when
//! every listener agrees.

use super::emit::{self, Table};
use super::parse::{Directive, Loc, Report};
use super::{assign, flag, number, text, At, Security, State};
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    V4,
    V6,
}

/// One Mosquitto listener as read.
#[derive(Debug, Default)]
pub struct Listener {
    /// The `listener` line, or the first option of the default listener.
    pub at: Option<Loc>,
    pub port: At<u16>,
    /// The listener line's address, or `bind_address` for the default listener.
    pub host: At<String>,
    pub websockets: At<bool>,
    pub socket_domain: At<Domain>,
    pub certfile: At<String>,
    pub keyfile: At<String>,
    pub cafile: At<String>,
    pub crlfile: At<String>,
    pub require_certificate: At<bool>,
    pub use_identity_as_username: At<bool>,
    pub mount_point: At<String>,
    pub max_connections: At<i64>,
    pub max_qos: At<u8>,
    pub max_topic_alias: At<u16>,
    /// With `per_listener_settings true`.
    pub security: Security,
    /// Any option set on it (for the default listener: whether Mosquitto starts it).
    pub touched: bool,
}

#[derive(Debug, Default)]
pub struct Listeners {
    pub default: Listener,
    pub explicit: Vec<Listener>,
}

impl State {
    /// The listener the directives of `scope` apply to now.
    pub(crate) fn listener_mut(&mut self, scope: usize) -> &mut Listener {
        let l = match self.cursor(scope).listener {
            Some(i) => self.listeners.explicit.get_mut(i),
            None => None,
        };
        match l {
            Some(l) => l,
            None => &mut self.listeners.default,
        }
    }
}

/// Directives that only configure TLS details Tern does not offer, with the reason.
fn tls_not_mapped(name: &str) -> Option<&'static str> {
    Some(match name {
        "capath" => "Tern reads CA certificates from one PEM file: concatenate the directory's certificates (cat DIR/*.pem > ca.pem) and set client_ca on this listener",
        "ciphers" | "ciphers_tls1.3" => "Tern's TLS (rustls) offers a fixed set of modern cipher suites: TLS 1.3's three, and for TLS 1.2 only ECDHE with AES-GCM or ChaCha20-Poly1305; OpenSSL cipher lists do not apply",
        "dhparamfile" => "rustls has no finite-field Diffie-Hellman; key exchange is ECDHE (X25519, P-256, P-384), which needs no parameters",
        "psk_hint" => "Tern has no TLS-PSK: use certificates, or usernames and passwords over TLS",
        "tls_engine" | "tls_engine_kpass_sha1" | "tls_keyform" => "Tern reads keys from PEM files only (no OpenSSL engines or TPM keys)",
        "use_subject_as_username" => "Tern can use a client certificate's Common Name as the username (use_identity_as_username), not the whole subject: rewrite the ACL's user lines to the CN",
        _ => return None,
    })
}

/// Listener directives; false when `d` is not one.
pub fn handle(st: &mut State, d: &Directive) -> bool {
    match d.name.as_str() {
        "listener" => listener_line(st, d),
        "port" => {
            if let Some(p) = number::<u16>(st, d).filter(|&p| p > 0) {
                let l = &mut st.listeners.default;
                assign(&mut st.not_mapped, &mut l.port, p, d);
                touch(l, d);
            }
        }
        "bind_address" => {
            if let Some(h) = text(st, d) {
                let l = &mut st.listeners.default;
                assign(&mut st.not_mapped, &mut l.host, h, d);
                touch(l, d);
            }
        }
        "protocol" => match d.args.first().map(String::as_str) {
            Some(p @ ("mqtt" | "websockets")) if d.args.len() == 1 => {
                let ws = p == "websockets";
                set(st, d, |l| &mut l.websockets, ws);
            }
            _ => st.not_mapped(
                d,
                format!("Tern listens for mqtt or websockets, not {:?}", d.rest),
            ),
        },
        "socket_domain" => match d.args.first().map(String::as_str) {
            Some("ipv4") => set(st, d, |l| &mut l.socket_domain, Domain::V4),
            Some("ipv6") => set(st, d, |l| &mut l.socket_domain, Domain::V6),
            _ => st.not_mapped(d, "expects ipv4 or ipv6"),
        },
        "certfile" | "keyfile" | "cafile" | "crlfile" => {
            if let Some(path) = text(st, d) {
                let name = d.name.clone();
                set(
                    st,
                    d,
                    |l| match name.as_str() {
                        "certfile" => &mut l.certfile,
                        "keyfile" => &mut l.keyfile,
                        "cafile" => &mut l.cafile,
                        _ => &mut l.crlfile,
                    },
                    path,
                );
            }
        }
        "require_certificate" => {
            if let Some(b) = flag(st, d) {
                set(st, d, |l| &mut l.require_certificate, b);
            }
        }
        "use_identity_as_username" => {
            if let Some(b) = flag(st, d) {
                set(st, d, |l| &mut l.use_identity_as_username, b);
            }
        }
        "mount_point" => {
            if let Some(m) = text(st, d) {
                if m.contains(['+', '#']) {
                    st.not_mapped(
                        d,
                        "a mount point cannot hold wildcards (Mosquitto refuses it too)",
                    );
                } else {
                    set(st, d, |l| &mut l.mount_point, m);
                }
            }
        }
        "max_connections" => {
            if let Some(n) = number::<i64>(st, d) {
                set(st, d, |l| &mut l.max_connections, n);
            }
        }
        "max_qos" => {
            if let Some(q) = number::<u8>(st, d) {
                if q > 2 {
                    st.not_mapped(d, "expects 0, 1 or 2");
                } else {
                    set(st, d, |l| &mut l.max_qos, q);
                }
            }
        }
        "max_topic_alias" => {
            if let Some(n) = number::<u16>(st, d) {
                set(st, d, |l| &mut l.max_topic_alias, n);
            }
        }
        "tls_version" => {
            let why = match d.args.first().map(String::as_str) {
                Some("tlsv1.2") => "Tern offers TLS 1.2 and 1.3, the minimum this sets; nothing to set".to_string(),
                Some("tlsv1.3") => "Tern offers TLS 1.2 and 1.3 and has no key to refuse 1.2: clients may still connect with TLS 1.2 (only its strong ECDHE AEAD suites)".to_string(),
                Some("tlsv1.1" | "tlsv1") => "Tern offers TLS 1.2 and 1.3 only: clients limited to TLS 1.1 or older cannot connect".to_string(),
                _ => format!("unknown TLS version {:?}; Tern offers TLS 1.2 and 1.3", d.rest),
            };
            touch(st.listener_mut(d.scope), d);
            if d.args.first().is_some_and(|v| v == "tlsv1.2") {
                st.equivalent(d, why);
            } else {
                st.not_mapped(d, why);
            }
        }
        "http_dir" => {
            touch(st.listener_mut(d.scope), d);
            st.not_mapped(d, "Tern's WebSocket listeners serve MQTT only, no files: serve them from a web server")
        }
        "bind_interface" => {
            touch(st.listener_mut(d.scope), d);
            st.not_mapped(d, "Tern binds an address, not an interface: put the interface's address in this listener's bind")
        }
        "use_username_as_clientid" => {
            touch(st.listener_mut(d.scope), d);
            st.not_mapped(d, "Tern keeps the client id the client sends; to keep one user from taking over another's session, give each user its own client ids in the ACL (pattern lines with %c and %u)")
        }
        "accept_protocol_versions" => {
            st.not_mapped(d, "Tern accepts MQTT 3.1, 3.1.1 and 5.0 on every listener")
        }
        name => match tls_not_mapped(name) {
            Some(why) => {
                touch(st.listener_mut(d.scope), d);
                st.not_mapped(d, why);
            }
            None => return false,
        },
    }
    true
}

/// Marks a listener as configured (the default listener then starts, as in Mosquitto).
fn touch(l: &mut Listener, d: &Directive) {
    l.touched = true;
    if l.at.is_none() {
        l.at = Some(d.at.clone());
    }
}

/// Sets a field of the current listener.
fn set<T>(st: &mut State, d: &Directive, field: impl FnOnce(&mut Listener) -> &mut At<T>, v: T) {
    let mut reports = std::mem::take(&mut st.not_mapped);
    let l = st.listener_mut(d.scope);
    touch(l, d);
    assign(&mut reports, field(l), v, d);
    st.not_mapped = reports;
}

/// `listener PORT [ADDRESS]`: a new listener, or the one with the same port and address
/// again (Mosquitto adds to it).
fn listener_line(st: &mut State, d: &Directive) {
    let port = match d.args.first().map(|p| p.parse::<u16>()) {
        Some(Ok(p)) if d.args.len() <= 2 => p,
        _ => {
            st.not_mapped(d, "expects a port and an optional address");
            return;
        }
    };
    let host = d.args.get(1).cloned();
    if port == 0 || host.as_deref().is_some_and(|h| h.contains('/')) {
        // Mosquitto's unix socket: port 0 and a path. Later options land on a listener that
        // is not emitted.
        st.not_mapped(
            d,
            "Tern listens on TCP only, not on unix sockets: this listener and its options are left out",
        );
        st.listeners.explicit.push(Listener {
            at: Some(d.at.clone()),
            port: None,
            ..Listener::default()
        });
    } else if let Some(i) = st.listeners.explicit.iter().position(|l| {
        l.port.as_ref().map(|p| p.0) == Some(port) && l.host.as_ref().map(|h| &h.0) == host.as_ref()
    }) {
        st.cursor(d.scope).listener = Some(i);
        return;
    } else {
        st.listeners.explicit.push(Listener {
            at: Some(d.at.clone()),
            port: Some((port, d.at.clone())),
            host: host.map(|h| (h, d.at.clone())),
            touched: true,
            ..Listener::default()
        });
    }
    let i = st.listeners.explicit.len() - 1;
    st.cursor(d.scope).listener = Some(i);
}

/// The listener kinds are the configuration's own.
pub use crate::config::listeners::Kind;

/// A listener as it will be written.
pub struct Planned {
    pub name: String,
    pub table: Table,
    /// `[listeners.NAME.auth]`; the authentication mapping adds to it.
    pub auth: Table,
    pub limits: Table,
    /// What the broker-wide keys and the authentication mapping need.
    pub max_qos: At<u8>,
    pub max_topic_alias: At<u16>,
    /// This listener's connection limit, when it has one (for `limits.max_connections`).
    pub max_connections: Option<(usize, Loc)>,
    pub security: Security,
    /// The `listener` line (none in local only mode).
    pub at: Option<Loc>,
}

/// The listeners Tern will have, in Mosquitto's order (the `listener` lines, then the default
/// listener when it is started), with their tables. Reports what cannot be carried over.
pub fn plan(st: &mut State) -> Vec<Planned> {
    let mut listeners = std::mem::take(&mut st.listeners);
    let mut all: Vec<Listener> = std::mem::take(&mut listeners.explicit);
    if listeners.default.touched {
        if listeners.default.port.is_none() {
            // Mosquitto's default port.
            listeners.default.port = listeners.default.at.clone().map(|a| (1883, a));
        }
        all.push(listeners.default);
    }
    if all.is_empty() {
        st.local_only = true;
        return vec![local_only()];
    }
    let mut used = HashSet::new();
    let mut out = Vec::new();
    for l in all {
        // A unix socket (reported already) has no port; a touched listener has a line.
        let (Some((port, _)), Some(at)) = (l.port.clone(), l.at.clone()) else {
            continue;
        };
        if let Some(p) = plan_one(st, l, port, at, &mut used) {
            out.push(p);
        }
    }
    out
}

/// Mosquitto 2 without any listener: port 1883 on the loopback interface only.
fn local_only() -> Planned {
    let mut t = Table::new("[listeners.tcp]");
    t.set("kind", emit::string("tcp"), "");
    t.set(
        "bind",
        emit::string("127.0.0.1:1883"),
        "no listener configured: Mosquitto 2's local only mode (it binds ::1 too)",
    );
    Planned {
        name: "tcp".into(),
        table: t,
        auth: auth_table("tcp"),
        limits: Table::new("[listeners.tcp.limits]"),
        max_qos: None,
        max_topic_alias: None,
        max_connections: None,
        security: Security::default(),
        at: None,
    }
}

fn auth_table(name: &str) -> Table {
    let mut auth = Table::new(format!("[listeners.{name}.auth]"));
    auth.set(
        "acl_mode",
        emit::string("per_message"),
        "Mosquitto's: SUBSCRIBE accepted, the ACL applied to each message delivered",
    );
    auth
}

fn report(st: &mut State, at: &Loc, directive: &str, why: impl Into<String>) {
    st.not_mapped.push(Report {
        at: at.clone(),
        directive: directive.into(),
        why: why.into(),
    });
}

/// One listener's tables, or None (reported) when it cannot be served as Mosquitto served it.
fn plan_one(
    st: &mut State,
    l: Listener,
    port: u16,
    at: Loc,
    used: &mut HashSet<String>,
) -> Option<Planned> {
    let tls = l.certfile.is_some() || l.keyfile.is_some();
    let ws = l.websockets.as_ref().is_some_and(|w| w.0);
    let kind = match (ws, tls) {
        (false, false) => Kind::Tcp,
        (false, true) => Kind::Tls,
        (true, false) => Kind::Ws,
        (true, true) => Kind::Wss,
    };
    if tls && (l.certfile.is_none() || l.keyfile.is_none()) {
        let (directive, a) = match (&l.certfile, &l.keyfile) {
            (Some((_, a)), _) => ("certfile", a),
            (_, Some((_, a))) => ("keyfile", a),
            _ => ("listener", &at),
        };
        report(st, &a.clone(), directive, "certfile and keyfile go together (Mosquitto refuses one alone too): this listener is left out rather than served without TLS");
        return None;
    }
    let (bind, bind_note) = match bind_of(&l, port) {
        Ok(b) => b,
        Err(why) => {
            let a = l.host.as_ref().map_or(&at, |h| &h.1).clone();
            report(st, &a, "listener", why);
            return None;
        }
    };
    let base = kind.label().to_string();
    let mut name = base.clone();
    let mut n = 1;
    while used.contains(&name) {
        name = if n == 1 {
            format!("{base}_{port}")
        } else {
            format!("{base}_{port}_{n}")
        };
        n += 1;
    }
    used.insert(name.clone());

    let mut t = Table::new(format!("[listeners.{name}]"));
    t.set("kind", emit::string(kind.label()), "");
    let mut from: Vec<String> = Vec::new();
    for a in [l.port.as_ref().map(|p| &p.1), l.host.as_ref().map(|h| &h.1)]
        .into_iter()
        .flatten()
    {
        let s = a.to_string();
        if !from.contains(&s) {
            from.push(s);
        }
    }
    if let Some((_, a)) = &l.socket_domain {
        from.push(format!("socket_domain {a}"));
    }
    let mut bind_comment = from.join(", ");
    if let Some(n) = bind_note {
        bind_comment.push_str(&format!(": {n}"));
    }
    t.set("bind", emit::string(&bind), bind_comment);
    if tls {
        tls_keys(st, &l, &mut t);
    } else {
        let ignored =
            "this listener has no certfile and keyfile, so no TLS (Mosquitto ignores it too)";
        if let Some((_, a)) = &l.cafile {
            report(st, a, "cafile", ignored);
        }
        if let Some((_, a)) = &l.crlfile {
            report(st, a, "crlfile", ignored);
        }
        if let Some((_, a)) = &l.require_certificate {
            report(st, a, "require_certificate", ignored);
        }
        if let Some((_, a)) = &l.use_identity_as_username {
            report(st, a, "use_identity_as_username", ignored);
        }
    }
    if ws {
        let a = l.websockets.as_ref().map_or(&at, |w| &w.1);
        t.set(
            "path",
            emit::string("/mqtt"),
            format!(
                "{a}: Mosquitto answers on any path, Tern on this one (MQTT.js and Paho use /mqtt)"
            ),
        );
    }
    if let Some((m, a)) = &l.mount_point {
        t.set("mount_point", emit::string(m), a.to_string());
    }
    let mut limits = Table::new(format!("[listeners.{name}.limits]"));
    let mut max_connections = None;
    if let Some((n, a)) = &l.max_connections {
        match usize::try_from(*n) {
            Err(_) => report(st, a, "max_connections", "unlimited on Mosquitto; Tern always has a bound: limits.max_connections (10000 by default) applies"),
            Ok(0) => report(st, a, "max_connections", "0 would take no connection; left out (Tern's limit is at least 1)"),
            Ok(n) => {
                limits.set("max_connections", n.to_string(), a.to_string());
                max_connections = Some((n, a.clone()));
            }
        }
    }
    Some(Planned {
        auth: auth_table(&name),
        name,
        table: t,
        limits,
        max_qos: l.max_qos,
        max_topic_alias: l.max_topic_alias,
        max_connections,
        security: l.security,
        at: Some(at),
    })
}

/// The TLS keys of a `tls` or `wss` listener.
fn tls_keys(st: &mut State, l: &Listener, t: &mut Table) {
    if let Some((c, a)) = &l.certfile {
        t.set("cert", emit::string(c), a.to_string());
    }
    if let Some((k, a)) = &l.keyfile {
        t.set("key", emit::string(k), a.to_string());
    }
    let require = l.require_certificate.as_ref().is_some_and(|r| r.0);
    let identity = l.use_identity_as_username.as_ref().is_some_and(|r| r.0);
    match &l.cafile {
        Some((ca, a)) if require || identity => t.set("client_ca", emit::string(ca), a.to_string()),
        Some((_, a)) => report(st, a, "cafile", "without require_certificate Mosquitto asks for no client certificate, and Tern would ask for one (optional) once client_ca is set: left out"),
        None => {
            for (on, field, directive) in [
                (require, &l.require_certificate, "require_certificate"),
                (identity, &l.use_identity_as_username, "use_identity_as_username"),
            ] {
                if let (true, Some((_, a))) = (on, field) {
                    report(st, a, directive, "needs cafile to verify client certificates against (Mosquitto refuses it too): set client_ca on this listener");
                }
            }
        }
    }
    if let Some((r, a)) = &l.require_certificate {
        t.set("require_client_cert", emit::boolean(*r), a.to_string());
    }
    if let Some((r, a)) = &l.use_identity_as_username {
        t.set("use_identity_as_username", emit::boolean(*r), a.to_string());
    }
    if let Some((c, a)) = &l.crlfile {
        t.set("crl_file", emit::string(c), a.to_string());
    }
}

/// The socket address to bind, and a note for the comment.
fn bind_of(l: &Listener, port: u16) -> Result<(String, Option<String>), String> {
    let domain = l.socket_domain.as_ref().map(|d| d.0);
    let Some((host, _)) = &l.host else {
        return Ok(match domain {
            Some(Domain::V4) => (
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).to_string(),
                None,
            ),
            Some(Domain::V6) => (
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).to_string(),
                Some("on Linux [::] takes IPv4 clients too (unless net.ipv6.bindv6only)".into()),
            ),
            None => (
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).to_string(),
                Some("all interfaces, IPv4 and IPv6, as Mosquitto (\"0.0.0.0\": IPv4 only)".into()),
            ),
        });
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((SocketAddr::new(ip, port).to_string(), None));
    }
    if host == "localhost" {
        return Ok(match domain {
            Some(Domain::V6) => (
                SocketAddr::from((Ipv6Addr::LOCALHOST, port)).to_string(),
                None,
            ),
            _ => (
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)).to_string(),
                (domain.is_none()).then(|| "Mosquitto bound ::1 as well".to_string()),
            ),
        });
    }
    let found: Vec<SocketAddr> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("Tern binds an address, not a host name, and {host:?} does not resolve here ({e}): this listener is left out; write its address"))?
        .filter(|a| match domain {
            Some(Domain::V4) => a.is_ipv4(),
            Some(Domain::V6) => a.is_ipv6(),
            None => true,
        })
        .collect();
    match found.first() {
        Some(a) => Ok((
            a.to_string(),
            Some(format!("{host:?} as it resolved when migrating; Tern binds addresses, not names")),
        )),
        None => Err(format!(
            "Tern binds an address, not a host name, and {host:?} has no address of that family here: this listener is left out; write its address"
        )),
    }
}

/// Keys of `[mqtt]` and `[limits]` that come from the listeners: `(key, value, comment)`.
#[derive(Default)]
pub struct BrokerWide {
    pub mqtt: Vec<(&'static str, String, String)>,
    pub limits: Vec<(&'static str, String, String)>,
}

/// `mqtt.max_qos` and `mqtt.topic_alias_maximum` from the listeners: set when every
/// listener has the same value (Mosquitto's defaults, 2 and 10, where not set), reported
/// otherwise. And `limits.max_connections`, which bounds every listener together in Tern:
/// raised to the listeners' sum when that is above its default.
pub fn broker_wide(st: &mut State, planned: &[Planned]) -> BrokerWide {
    let mut wide = BrokerWide::default();
    let limited: Vec<&(usize, Loc)> = planned
        .iter()
        .filter_map(|p| p.max_connections.as_ref())
        .collect();
    let sum: usize = limited.iter().map(|(n, _)| *n).sum();
    // Tern's default `limits.max_connections`, which bounds all listeners together.
    if sum > crate::config::Limits::default().max_connections {
        let lines: Vec<Loc> = limited.iter().map(|(_, a)| a.clone()).collect();
        wide.limits.push((
            "max_connections",
            sum.to_string(),
            format!(
                "{}: the listeners' max_connections together (this key bounds them all)",
                super::locs(&lines)
            ),
        ));
    }
    let out = &mut wide.mqtt;
    let qos: Vec<(u64, Option<&Loc>)> = planned
        .iter()
        .map(|p| {
            p.max_qos
                .as_ref()
                .map_or((2, None), |(q, a)| (u64::from(*q), Some(a)))
        })
        .collect();
    let alias: Vec<(u64, Option<&Loc>)> = planned
        .iter()
        .map(|p| {
            p.max_topic_alias
                .as_ref()
                .map_or((10, None), |(q, a)| (u64::from(*q), Some(a)))
        })
        .collect();
    for (key, directive, values) in [
        ("max_qos", "max_qos", qos),
        ("topic_alias_maximum", "max_topic_alias", alias),
    ] {
        let set: Vec<&Loc> = values.iter().filter_map(|(_, a)| *a).collect();
        let Some(&(first, _)) = values.first() else {
            continue;
        };
        if set.is_empty() {
            continue;
        }
        if values.iter().all(|(v, _)| *v == first) {
            let lines: Vec<Loc> = set.iter().map(|a| (*a).clone()).collect();
            out.push((
                key,
                first.to_string(),
                format!(
                    "{}: per listener on Mosquitto, broker-wide in Tern",
                    super::locs(&lines)
                ),
            ));
        } else {
            let listing: Vec<String> = planned
                .iter()
                .zip(&values)
                .map(|(p, (v, _))| format!("{} {v}", p.name))
                .collect();
            let why = format!(
                "per listener on Mosquitto, broker-wide in Tern (mqtt.{key}), and the listeners differ ({}): set it by hand",
                listing.join(", ")
            );
            for a in set {
                let a = a.clone();
                report(st, &a, directive, why.clone());
            }
        }
    }
    wide
}

/// The listener tables, each followed by its auth and limits tables.
pub fn tables(planned: Vec<Planned>) -> Vec<Table> {
    let mut out = Vec::new();
    for p in planned {
        out.push(p.table);
        out.push(p.auth);
        out.push(p.limits);
    }
    out
}
