//! `[listeners.NAME]`: named MQTT listeners, each with its own transport, addresses, files,
//! topic mount point, PROXY protocol, authentication chain and per-client limits.
//!
//! One struct holds every kind's keys rather than one struct per kind: a listener's kind is
//! a key of its own (`kind`, or the name when the name is `tcp`, `tls`, `ws` or `wss`, which
//! keeps every configuration written before listeners had names working unchanged), and
//! serde cannot pick a struct by a key that may be absent while still naming unknown keys.
//! [`ListenerConfig::validate`] refuses the keys that do not belong to the kind instead.

use super::{ConfigError, Limits};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A listener's transport.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Plain MQTT over TCP.
    Tcp,
    /// MQTT over TLS (rustls; TLS 1.2 and 1.3).
    Tls,
    /// MQTT over WebSockets (browsers, web apps).
    Ws,
    /// MQTT over WebSockets over TLS.
    Wss,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Tls => "tls",
            Kind::Ws => "ws",
            Kind::Wss => "wss",
        }
    }

    fn from_name(name: &str) -> Option<Kind> {
        match name {
            "tcp" => Some(Kind::Tcp),
            "tls" => Some(Kind::Tls),
            "ws" => Some(Kind::Ws),
            "wss" => Some(Kind::Wss),
            _ => None,
        }
    }

    pub fn is_tls(self) -> bool {
        matches!(self, Kind::Tls | Kind::Wss)
    }

    pub fn is_websocket(self) -> bool {
        matches!(self, Kind::Ws | Kind::Wss)
    }
}

/// The listeners by name. Without any `[listeners]` table the built-in default applies (TCP
/// on 127.0.0.1:1883, named `tcp`); once a file has `[listeners.*]` tables, only those
/// listeners are on.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(transparent)]
pub struct Listeners(pub BTreeMap<String, ListenerConfig>);

impl Default for Listeners {
    fn default() -> Self {
        let mut m = BTreeMap::new();
        let mut tcp = ListenerConfig::new(Kind::Tcp, SocketAddr::from(([127, 0, 0, 1], 1883)));
        // Named `tcp`, so the kind goes without saying (as in config/default.toml).
        tcp.kind = None;
        m.insert("tcp".to_string(), tcp);
        Listeners(m)
    }
}

impl Listeners {
    /// Every listener by name, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ListenerConfig)> {
        self.0.iter().map(|(n, l)| (n.as_str(), l))
    }

    pub fn get(&self, name: &str) -> Option<&ListenerConfig> {
        self.0.get(name)
    }
}

/// How a SUBSCRIBE meets the ACL.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AclMode {
    /// A SUBSCRIBE whose filter the ACL does not fully cover is refused (0x87; 3.1.1 0x80):
    /// the client learns at once that it will not get what it asked for.
    #[default]
    Subscribe,
    /// Mosquitto's way: every SUBSCRIBE the protocol allows is granted and the ACL decides
    /// per delivered message, so `#` from a client allowed `read devices/#` gets the
    /// `devices/` messages and nothing else.
    PerMessage,
}

/// An authentication backend a listener's chain names.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// `[auth] password_file`: decides for the users it knows, passes the others.
    PasswordFile,
    /// `[auth.jwt]`: decides when the token field holds a JWT, passes otherwise.
    Jwt,
    /// `[auth.http]`: always decides (so it belongs last).
    Http,
}

impl Backend {
    pub fn label(self) -> &'static str {
        match self {
            Backend::PasswordFile => "password_file",
            Backend::Jwt => "jwt",
            Backend::Http => "http",
        }
    }
}

/// `[listeners.NAME.auth]`: this listener's departures from `[auth]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerAuth {
    /// The backends CONNECT's credentials go through, in order. Absent: the password file
    /// when `[auth] password_file` is set, else none (anonymous rules only) — the behaviour
    /// before chains existed.
    pub chain: Option<Vec<Backend>>,
    /// Overrides `auth.allow_anonymous` on this listener.
    pub allow_anonymous: Option<bool>,
    /// How SUBSCRIBE meets the ACL on this listener.
    pub acl_mode: AclMode,
}

/// `[listeners.NAME.limits]`: per-client limits that differ on this listener; the others
/// come from `[limits]`. Only the keys that are about one client's connection are here:
/// queue sizes belong to sessions, which move between listeners.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsOverride {
    pub max_packet_size: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub max_inflight: Option<u16>,
    #[serde(with = "super::duration::option_seconds")]
    pub max_keepalive: Option<Duration>,
    #[serde(with = "super::duration::option_seconds")]
    pub max_session_expiry: Option<Duration>,
    pub max_inbound_qos2: Option<usize>,
    #[serde(with = "super::duration::option_seconds")]
    pub connect_timeout: Option<Duration>,
    #[serde(with = "super::duration::option_seconds")]
    pub write_timeout: Option<Duration>,
    pub max_connect_rate: Option<u32>,
    /// Connections on this listener; `limits.max_connections` still bounds them all.
    pub max_connections: Option<usize>,
    pub max_topic_length: Option<usize>,
    pub max_topic_levels: Option<usize>,
    pub max_subscriptions: Option<usize>,
    pub max_publish_rate: Option<u32>,
    pub max_publish_bytes_rate: Option<u32>,
}

impl LimitsOverride {
    /// `base` with this listener's values in place.
    pub fn apply(&self, base: &Limits) -> Limits {
        let mut l = base.clone();
        macro_rules! take {
            ($($k:ident),*) => { $( if let Some(v) = self.$k { l.$k = v; } )* };
        }
        take!(
            max_packet_size,
            receive_maximum,
            max_inflight,
            max_keepalive,
            max_session_expiry,
            max_inbound_qos2,
            connect_timeout,
            write_timeout,
            max_connect_rate,
            max_topic_length,
            max_topic_levels,
            max_subscriptions,
            max_publish_rate,
            max_publish_bytes_rate
        );
        l
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_empty(s: &str) -> bool {
    s.is_empty()
}

/// One `[listeners.NAME]` table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `tcp`, `tls`, `ws` or `wss`; may be left out when the name is one of those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    pub bind: SocketAddr,
    /// Server certificate chain (PEM); TLS and WSS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1); TLS and WSS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates are verified against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate signed by `client_ca`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub require_client_cert: bool,
    /// The verified client certificate's Common Name becomes the username.
    #[serde(default, skip_serializing_if = "is_false")]
    pub use_identity_as_username: bool,
    /// Certificate revocation lists (PEM) checked against client certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl_file: Option<PathBuf>,
    /// WS and WSS: the HTTP path MQTT is served on (default `/mqtt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// WS and WSS: browser origins allowed to connect; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    /// A topic prefix for this listener's clients: added to what they publish and subscribe
    /// to, taken off what they receive (as Mosquitto's `mount_point`).
    #[serde(default, skip_serializing_if = "is_empty")]
    pub mount_point: String,
    /// Every connection starts with a PROXY protocol (v1 or v2) header naming the client's
    /// address; one without a valid header is closed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub proxy_protocol: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<ListenerAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsOverride>,
}

impl ListenerConfig {
    pub fn new(kind: Kind, bind: SocketAddr) -> ListenerConfig {
        ListenerConfig {
            kind: Some(kind),
            bind,
            cert: None,
            key: None,
            client_ca: None,
            require_client_cert: false,
            use_identity_as_username: false,
            crl_file: None,
            path: None,
            allowed_origins: Vec::new(),
            mount_point: String::new(),
            proxy_protocol: false,
            auth: None,
            limits: None,
        }
    }

    /// The kind, given or taken from the name; `None` when neither says (refused by
    /// validation).
    pub fn kind_for(&self, name: &str) -> Option<Kind> {
        self.kind.or_else(|| Kind::from_name(name))
    }

    /// The TLS part, in the TLS reloader's terms (TLS and WSS listeners).
    pub fn tls(&self) -> Option<super::TlsListenerConfig> {
        Some(super::TlsListenerConfig {
            bind: self.bind,
            cert: self.cert.clone()?,
            key: self.key.clone()?,
            client_ca: self.client_ca.clone(),
            require_client_cert: self.require_client_cert,
            use_identity_as_username: self.use_identity_as_username,
            crl_file: self.crl_file.clone(),
        })
    }

    /// The WebSocket part (WS and WSS listeners).
    pub fn ws(&self) -> super::WsListenerConfig {
        super::WsListenerConfig {
            bind: self.bind,
            path: self.path.clone().unwrap_or_else(super::default_ws_path),
            allowed_origins: self.allowed_origins.clone(),
        }
    }

    /// The per-client limits on this listener.
    pub fn limits(&self, base: &Limits) -> Limits {
        match &self.limits {
            Some(o) => o.apply(base),
            None => base.clone(),
        }
    }

    /// This listener's chain, given `[auth]`'s files.
    pub fn chain(&self, auth: &super::AuthConfig) -> Vec<Backend> {
        match self.auth.as_ref().and_then(|a| a.chain.clone()) {
            Some(c) => c,
            None if auth.password_file.is_some() => vec![Backend::PasswordFile],
            None => Vec::new(),
        }
    }

    pub fn allow_anonymous(&self, auth: &super::AuthConfig) -> bool {
        self.auth
            .as_ref()
            .and_then(|a| a.allow_anonymous)
            .unwrap_or(auth.allow_anonymous)
    }

    pub fn acl_mode(&self) -> AclMode {
        self.auth.as_ref().map(|a| a.acl_mode).unwrap_or_default()
    }

    /// Rules serde cannot express, with the key path named in the error.
    pub fn validate(&self, name: &str, config: &super::Config) -> Result<(), ConfigError> {
        let auth = &config.auth;
        let err = |key: &str, message: String| {
            Err(ConfigError::Value {
                key: format!("listeners.{name}.{key}"),
                message,
            })
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return err(
                "",
                "a listener's name is letters, digits, '_' and '-'".to_string(),
            );
        }
        if matches!(name, "metrics" | "cluster") {
            // The ready line names the metrics port and the cluster node with these words.
            return err("", format!("\"{name}\" is reserved; choose another name"));
        }
        let Some(kind) = self.kind_for(name) else {
            return err(
                "kind",
                "required: \"tcp\", \"tls\", \"ws\" or \"wss\" (only a listener named one of those may leave it out)"
                    .to_string(),
            );
        };
        let k = kind.label();
        if kind.is_tls() {
            if self.cert.is_none() {
                return err("cert", format!("required on a {k} listener"));
            }
            if self.key.is_none() {
                return err("key", format!("required on a {k} listener"));
            }
            if self.client_ca.is_none() {
                if self.require_client_cert {
                    return err(
                        "require_client_cert",
                        format!("needs listeners.{name}.client_ca to verify client certificates against"),
                    );
                }
                if self.use_identity_as_username {
                    return err(
                        "use_identity_as_username",
                        format!("needs listeners.{name}.client_ca (an unverified certificate proves nothing)"),
                    );
                }
                if self.crl_file.is_some() {
                    return err(
                        "crl_file",
                        format!("needs listeners.{name}.client_ca (revocation is of client certificates)"),
                    );
                }
            }
        } else {
            for (key, set) in [
                ("cert", self.cert.is_some()),
                ("key", self.key.is_some()),
                ("client_ca", self.client_ca.is_some()),
                ("require_client_cert", self.require_client_cert),
                ("use_identity_as_username", self.use_identity_as_username),
                ("crl_file", self.crl_file.is_some()),
            ] {
                if set {
                    return err(
                        key,
                        format!("a {k} listener has no TLS (kind \"tls\" or \"wss\" has)"),
                    );
                }
            }
        }
        if kind.is_websocket() {
            let ws = self.ws();
            if !ws.path.starts_with('/') || ws.path.contains(['?', '#', ' ']) {
                return err(
                    "path",
                    "must be an absolute HTTP path such as \"/mqtt\"".to_string(),
                );
            }
            if ws
                .allowed_origins
                .iter()
                .any(|o| !o.contains("://") || o.ends_with('/'))
            {
                return err(
                    "allowed_origins",
                    "each origin is scheme://host[:port] without a path, e.g. \"https://app.example.com\"".to_string(),
                );
            }
        } else if self.path.is_some() || !self.allowed_origins.is_empty() {
            let key = if self.path.is_some() {
                "path"
            } else {
                "allowed_origins"
            };
            return err(key, format!("a {k} listener is not a WebSocket listener"));
        }
        if !self.mount_point.is_empty()
            && (self.mount_point.contains(['+', '#', '\0']) || self.mount_point.starts_with('$'))
        {
            return err(
                "mount_point",
                "a topic prefix without wildcards that does not start with '$', e.g. \"site1/\""
                    .to_string(),
            );
        }
        if let Some(chain) = self.auth.as_ref().and_then(|a| a.chain.as_ref()) {
            for (i, b) in chain.iter().enumerate() {
                let configured = match b {
                    Backend::PasswordFile => auth.password_file.is_some(),
                    Backend::Jwt => auth.jwt.is_some(),
                    Backend::Http => auth.http.is_some(),
                };
                if !configured {
                    let needs = match b {
                        Backend::PasswordFile => "[auth] password_file",
                        Backend::Jwt => "an [auth.jwt] section",
                        Backend::Http => "an [auth.http] section",
                    };
                    return err("auth.chain", format!("\"{}\" needs {needs}", b.label()));
                }
                if chain[..i].contains(b) {
                    return err("auth.chain", format!("\"{}\" is named twice", b.label()));
                }
            }
            if let Some(pos) = chain.iter().position(|b| *b == Backend::Http) {
                if pos + 1 != chain.len() {
                    return err(
                        "auth.chain",
                        "\"http\" always decides, so nothing after it is ever asked: put it last"
                            .to_string(),
                    );
                }
            }
        }
        if self.limits.is_some() {
            // The listener's limits as its clients get them, under [limits]' own rules.
            self.limits(&config.limits)
                .check(&format!("listeners.{name}.limits"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn the_four_old_tables_still_mean_what_they_meant() {
        let c = Config::from_toml(
            "[listeners.tcp]\nbind = \"127.0.0.1:0\"\n[listeners.ws]\nbind = \"127.0.0.1:0\"\npath = \"/x\"\n",
        )
        .unwrap();
        let kinds: Vec<_> = c
            .listeners
            .iter()
            .map(|(n, l)| (n.to_string(), l.kind_for(n).unwrap().label()))
            .collect();
        assert_eq!(kinds, vec![("tcp".into(), "tcp"), ("ws".into(), "ws")]);
        assert_eq!(c.listeners.get("ws").unwrap().ws().path, "/x");
    }

    #[test]
    fn a_named_listener_needs_a_kind_and_the_kinds_keys() {
        let e = Config::from_toml("[listeners.internal]\nbind = \"127.0.0.1:0\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listeners.internal.kind"), "{e}");
        let e = Config::from_toml("[listeners.devices]\nkind = \"tls\"\nbind = \"127.0.0.1:0\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listeners.devices.cert"), "{e}");
        let e = Config::from_toml(
            "[listeners.internal]\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\ncert = \"x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("listeners.internal.cert"), "{e}");
        let e = Config::from_toml(
            "[listeners.internal]\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\nbogus = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn overrides_apply_per_listener() {
        let c = Config::from_toml(
            "[limits]\nmax_packet_size = 5000\n\
             [listeners.internal]\nkind = \"tcp\"\nbind = \"127.0.0.1:0\"\n\
             [listeners.internal.limits]\nmax_packet_size = 9000\nmax_keepalive = \"1m\"\n\
             [listeners.internal.auth]\nacl_mode = \"per_message\"\nallow_anonymous = true\n\
             [listeners.tcp]\nbind = \"127.0.0.1:0\"\n",
        )
        .unwrap();
        let internal = c.listeners.get("internal").unwrap();
        let l = internal.limits(&c.limits);
        assert_eq!(l.max_packet_size, 9000);
        assert_eq!(l.max_keepalive.as_secs(), 60);
        assert_eq!(
            c.listeners
                .get("tcp")
                .unwrap()
                .limits(&c.limits)
                .max_packet_size,
            5000
        );
        assert_eq!(internal.acl_mode(), super::AclMode::PerMessage);
        assert!(internal.allow_anonymous(&c.auth));
        assert!(!c.listeners.get("tcp").unwrap().allow_anonymous(&c.auth));
    }

    /// A listener's limits obey [limits]' own rules, merged: a timeout beyond a day (a
    /// deadline an `Instant` cannot hold) and a bytes rate below the listener's packet size
    /// are refused, naming the listener's key.
    #[test]
    fn a_listeners_limits_follow_the_rules_of_limits() {
        let t = |limits: &str| {
            Config::from_toml(&format!(
                "[listeners.tcp]\nbind = \"127.0.0.1:0\"\n[listeners.tcp.limits]\n{limits}\n"
            ))
        };
        for (bad, key) in [
            (
                "connect_timeout = \"400d\"",
                "listeners.tcp.limits.connect_timeout",
            ),
            (
                "write_timeout = \"0s\"",
                "listeners.tcp.limits.write_timeout",
            ),
            (
                "max_packet_size = 10",
                "listeners.tcp.limits.max_packet_size",
            ),
            (
                "max_keepalive = 70000",
                "listeners.tcp.limits.max_keepalive",
            ),
            (
                "max_packet_size = 100000\nmax_publish_bytes_rate = 5000",
                "listeners.tcp.limits.max_publish_bytes_rate",
            ),
        ] {
            let e = t(bad).unwrap_err().to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
        assert!(t("max_packet_size = 100000\nmax_publish_bytes_rate = 200000").is_ok());
    }

    #[test]
    fn a_chain_names_configured_backends_with_http_last() {
        let e = Config::from_toml(
            "[listeners.tcp]\nbind = \"127.0.0.1:0\"\n[listeners.tcp.auth]\nchain = [\"jwt\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("listeners.tcp.auth.chain") && e.contains("[auth.jwt]"),
            "{e}"
        );
        let e = Config::from_toml(
            "[auth]\npassword_file = \"p\"\n[listeners.tcp]\nbind = \"127.0.0.1:0\"\n[listeners.tcp.auth]\nchain = [\"password_file\", \"password_file\"]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("twice"), "{e}");
        let c = Config::from_toml(
            "[auth]\npassword_file = \"p\"\n[listeners.tcp]\nbind = \"127.0.0.1:0\"\n",
        )
        .unwrap();
        assert_eq!(
            c.listeners.get("tcp").unwrap().chain(&c.auth),
            vec![super::Backend::PasswordFile]
        );
    }

    #[test]
    fn a_mount_point_is_a_plain_prefix() {
        for bad in ["a/#", "$SYS/", "a/+/"] {
            let e = Config::from_toml(&format!(
                "[listeners.tcp]\nbind = \"127.0.0.1:0\"\nmount_point = \"{bad}\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("listeners.tcp.mount_point"), "{bad}: {e}");
        }
    }
}
