//! `[auth.http]`: the HTTP authentication backend's settings (src/auth/http.rs).
//!
//! The defaults, and why:
//!
//! - `timeout = "2s"`: a healthy service answers in milliseconds; two seconds absorb a pause or
//!   a new TLS handshake across a region, yet stay far inside `limits.connect_timeout` (10 s)
//!   and the 30 s common clients wait for CONNACK, so a client refused because the service is
//!   dead gets its refusal rather than timing out and retrying at once, and a PUBLISH or
//!   SUBSCRIBE waiting for the ACL service holds up its own client for 2 s at most. The
//!   timeout covers the whole check: the wait for a free request slot, connecting, and the
//!   answer's head.
//! - `max_concurrent = 64`: requests in flight to the service at once; enough for a
//!   reconnect storm against a service answering in 10 ms (6,400 checks a second), small
//!   enough not to knock over a modest service.
//! - `cache_ttl = "30s"`: a reconnect storm, or a client publishing to the same topics, asks
//!   the service once per 30 s. Allows and denies are both cached: a deny is the service's
//!   decision as much as an allow, and caching it spares the service a client retrying bad
//!   credentials in a loop. Timeouts and errors are never cached (they are not decisions).
//!   `0` turns the cache off.
//! - `cache_max_entries = 100000`: the cache's bound; about 10 MB at most.
//! - `allow_insecure_http = false`: `http://` URLs only to a loopback host (`127.0.0.0/8`,
//!   `::1`, `localhost`), because the request carries the client's password in clear.

use super::{duration, ConfigError};
use hyper::header::{HeaderName, HeaderValue};
use hyper::Uri;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpAuthConfig {
    /// Where CONNECT's credentials are POSTed (required when `[auth.http]` is present).
    pub connect_url: String,
    /// When set, every SUBSCRIBE filter and PUBLISH topic is POSTed here for authorisation.
    pub acl_url: Option<String>,
    /// Longest a check takes: a free request slot, the connection and the answer's head.
    #[serde(with = "duration::seconds")]
    pub timeout: Duration,
    /// Requests in flight to the service at once; a check finding none free waits within
    /// its timeout.
    pub max_concurrent: usize,
    /// How long an answer (allow or deny) is reused for the same request; `0`: never.
    #[serde(with = "duration::seconds")]
    pub cache_ttl: Duration,
    /// Most answers kept in the cache.
    pub cache_max_entries: usize,
    /// Allow `http://` URLs to hosts other than loopback (passwords then cross the network
    /// in clear).
    pub allow_insecure_http: bool,
    /// CA certificates (PEM) that the service's certificate is checked against for
    /// `https://`; none: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Headers sent with every request, such as `Authorization = "Bearer ..."`.
    pub headers: BTreeMap<String, String>,
}

impl Default for HttpAuthConfig {
    fn default() -> Self {
        HttpAuthConfig {
            connect_url: String::new(),
            acl_url: None,
            timeout: Duration::from_secs(2),
            max_concurrent: 64,
            cache_ttl: Duration::from_secs(30),
            cache_max_entries: 100_000,
            allow_insecure_http: false,
            ca_file: None,
            headers: BTreeMap::new(),
        }
    }
}

/// Headers the client writes itself: configuring them would break the request.
const RESERVED_HEADERS: [&str; 5] = [
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
];

fn invalid(key: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key,
        message: message.into(),
    })
}

/// Whether `host` (as a URL holds it, IPv6 in brackets) is a loopback address or `localhost`.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}

impl HttpAuthConfig {
    /// Rules serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.connect_url.is_empty() {
            return invalid(
                "auth.http.connect_url",
                "required when [auth.http] is present, e.g. \"https://auth.example.com/mqtt/connect\"",
            );
        }
        self.check_url("auth.http.connect_url", &self.connect_url)?;
        if let Some(url) = &self.acl_url {
            self.check_url("auth.http.acl_url", url)?;
        }
        if self.timeout < Duration::from_millis(10) || self.timeout > Duration::from_secs(60) {
            return invalid("auth.http.timeout", "must be between 10ms and 60s");
        }
        if self.max_concurrent == 0 || self.max_concurrent > 10_000 {
            return invalid("auth.http.max_concurrent", "must be between 1 and 10000");
        }
        if self.cache_ttl > Duration::from_secs(86_400) {
            return invalid("auth.http.cache_ttl", "must be at most 1d (0: no cache)");
        }
        if self.cache_max_entries > 10_000_000 {
            return invalid(
                "auth.http.cache_max_entries",
                "must be at most 10000000 (0: no cache)",
            );
        }
        for (name, value) in &self.headers {
            let Ok(parsed) = HeaderName::from_bytes(name.as_bytes()) else {
                return invalid(
                    "auth.http.headers",
                    format!("{name:?} is not a header name"),
                );
            };
            if RESERVED_HEADERS.contains(&parsed.as_str()) {
                return invalid(
                    "auth.http.headers",
                    format!("{name:?} is set by Tern itself"),
                );
            }
            if HeaderValue::from_str(value).is_err() {
                return invalid(
                    "auth.http.headers",
                    format!("the value of {name:?} is not a header value (visible ASCII)"),
                );
            }
        }
        Ok(())
    }

    /// An absolute `http://` or `https://` URL; `http://` only to loopback unless allowed.
    fn check_url(&self, key: &'static str, url: &str) -> Result<(), ConfigError> {
        let Ok(uri) = url.parse::<Uri>() else {
            return invalid(key, format!("{url:?} is not a URL"));
        };
        let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
            return invalid(key, format!("{url:?} has no host"));
        };
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            // hyper sends no Authorization header for it: the service would see no
            // credentials, and the password would sit in the URL, which is logged.
            return invalid(
                key,
                format!(
                    "{url:?}: user information in the URL is not supported; send credentials \
                     with auth.http.headers (e.g. Authorization = \"Basic ...\")"
                ),
            );
        }
        match uri.scheme_str() {
            Some("https") => Ok(()),
            Some("http") if self.allow_insecure_http || is_loopback_host(host) => Ok(()),
            Some("http") => invalid(
                key,
                format!(
                    "{url:?}: plain http:// carries passwords in clear, so it may only go to a \
                     loopback host (127.0.0.1, ::1, localhost); use https://, or set \
                     auth.http.allow_insecure_http = true"
                ),
            ),
            _ => invalid(key, format!("{url:?}: give an http:// or https:// URL")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn with_url(url: &str) -> HttpAuthConfig {
        HttpAuthConfig {
            connect_url: url.into(),
            ..HttpAuthConfig::default()
        }
    }

    fn key_of(r: Result<(), ConfigError>) -> Option<&'static str> {
        match r {
            Err(ConfigError::Invalid { key, .. }) => Some(key),
            _ => None,
        }
    }

    #[test]
    fn user_information_in_a_url_is_refused() {
        for url in [
            "https://svc:secret@auth.example.com/mqtt",
            "http://user@127.0.0.1:8080/auth",
        ] {
            let refused = with_url(url).validate();
            assert_eq!(
                key_of(with_url(url).validate()),
                Some("auth.http.connect_url")
            );
            assert!(
                format!("{:?}", refused).contains("auth.http.headers"),
                "{refused:?}"
            );
            let acl = HttpAuthConfig {
                acl_url: Some(url.into()),
                ..with_url("https://auth.example.com/mqtt")
            };
            assert_eq!(key_of(acl.validate()), Some("auth.http.acl_url"), "{url}");
        }
    }

    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        for ok in [
            "http://127.0.0.1:8080/auth",
            "http://127.1.2.3/auth",
            "http://[::1]:8080/auth",
            "http://localhost:8080/auth",
            "http://LOCALHOST/auth",
            "https://auth.example.com/mqtt",
            "https://10.0.0.1:8443/mqtt",
        ] {
            assert!(with_url(ok).validate().is_ok(), "{ok}");
        }
        for refused in [
            "http://auth.example.com/mqtt",
            "http://10.0.0.1:8080/auth",
            "http://[::ffff:10.0.0.1]/auth",
            "http://localhost.example.com/auth",
        ] {
            assert_eq!(
                key_of(with_url(refused).validate()),
                Some("auth.http.connect_url"),
                "{refused}"
            );
            let allowed = HttpAuthConfig {
                allow_insecure_http: true,
                ..with_url(refused)
            };
            assert!(allowed.validate().is_ok(), "{refused} when allowed");
        }
        let acl = HttpAuthConfig {
            acl_url: Some("http://auth.example.com/acl".into()),
            ..with_url("http://127.0.0.1/auth")
        };
        assert_eq!(key_of(acl.validate()), Some("auth.http.acl_url"));
        assert!(is_loopback_host("[::ffff:127.0.0.1]"));
    }

    #[test]
    fn refuses_what_cannot_work() {
        assert_eq!(
            key_of(HttpAuthConfig::default().validate()),
            Some("auth.http.connect_url")
        );
        for bad in [
            "ftp://127.0.0.1/x",
            "/just/a/path",
            "127.0.0.1:80",
            "not a url",
        ] {
            assert_eq!(
                key_of(with_url(bad).validate()),
                Some("auth.http.connect_url"),
                "{bad}"
            );
        }
        let base = with_url("http://127.0.0.1/auth");
        let cases: [(HttpAuthConfig, &str); 7] = [
            (
                HttpAuthConfig {
                    timeout: Duration::ZERO,
                    ..base.clone()
                },
                "auth.http.timeout",
            ),
            (
                HttpAuthConfig {
                    timeout: Duration::from_secs(61),
                    ..base.clone()
                },
                "auth.http.timeout",
            ),
            (
                HttpAuthConfig {
                    max_concurrent: 0,
                    ..base.clone()
                },
                "auth.http.max_concurrent",
            ),
            (
                HttpAuthConfig {
                    cache_ttl: Duration::from_secs(86_401),
                    ..base.clone()
                },
                "auth.http.cache_ttl",
            ),
            (
                HttpAuthConfig {
                    headers: [("bad name".to_string(), "x".to_string())].into(),
                    ..base.clone()
                },
                "auth.http.headers",
            ),
            (
                HttpAuthConfig {
                    headers: [("Content-Type".to_string(), "text/plain".to_string())].into(),
                    ..base.clone()
                },
                "auth.http.headers",
            ),
            (
                HttpAuthConfig {
                    headers: [("X-Key".to_string(), "line\nbreak".to_string())].into(),
                    ..base.clone()
                },
                "auth.http.headers",
            ),
        ];
        for (cfg, key) in cases {
            assert_eq!(key_of(cfg.validate()), Some(key), "{cfg:?}");
        }
        let fine = HttpAuthConfig {
            cache_ttl: Duration::ZERO,
            headers: [("Authorization".to_string(), "Bearer abc".to_string())].into(),
            ..base
        };
        assert!(fine.validate().is_ok());
    }

    /// From a TOML file as the broker loads it: durations in both forms, the defaults for the
    /// rest, and the section's validation run by the configuration's.
    #[test]
    fn reads_the_section_from_toml() {
        let c = Config::from_toml(
            "[auth.http]\nconnect_url = \"http://127.0.0.1:9000/connect\"\n\
             acl_url = \"http://127.0.0.1:9000/acl\"\ntimeout = \"500ms\"\ncache_ttl = 60\n\
             [auth.http.headers]\nAuthorization = \"Bearer t\"\n",
        )
        .expect("valid");
        let h = c.auth.http.expect("section present");
        assert_eq!(h.connect_url, "http://127.0.0.1:9000/connect");
        assert_eq!(h.acl_url.as_deref(), Some("http://127.0.0.1:9000/acl"));
        assert_eq!(h.timeout, Duration::from_millis(500));
        assert_eq!(h.cache_ttl, Duration::from_secs(60));
        assert_eq!(h.max_concurrent, 64);
        // Header names are case-insensitive (the loader may lower-case keys).
        assert!(
            h.headers
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("authorization") && v == "Bearer t"),
            "{:?}",
            h.headers
        );
        let err = Config::from_toml("[auth.http]\ntimeout = \"1s\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("auth.http.connect_url"), "{err}");
        let err = Config::from_toml("[auth.http]\nconnect_url = \"http://127.0.0.1/\"\nurl = 1\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("url"), "{err}");
    }
}
