//! `[auth.jwt]`: the JWT authentication backend's settings (src/auth/jwt.rs).
//!
//! A client presents a signed token (RFC 7519) in its CONNECT password (or username); the
//! token's signature is checked against a shared secret, PEM public keys or an identity
//! provider's JWKS, then its claims give the client's username, the client id it must use and
//! the topics it may use. Every default below is chosen so that the smallest useful table,
//! one key source, accepts what common identity providers issue and nothing weaker.

use super::auth_http::is_loopback_host;
use super::{duration, ConfigError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Which CONNECT field carries the token.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TokenField {
    /// The password: where MQTT clients put a secret, and where most brokers look for tokens.
    #[default]
    Password,
    /// The username, for clients that can set only that; needs `username_claim`.
    Username,
}

/// A signature algorithm a token may use. Only these three: HMAC for a shared secret, RSA and
/// ECDSA P-256 for public keys, the ones identity providers issue by default.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    #[serde(rename = "HS256")]
    Hs256,
    #[serde(rename = "RS256")]
    Rs256,
    #[serde(rename = "ES256")]
    Es256,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// `"password"` (default: where clients put secrets) or `"username"`.
    pub token_field: TokenField,
    /// The algorithms accepted. Default: all three; a token's `alg` is only ever checked
    /// against a key of its own kind (an RSA public key is never used as an HMAC secret).
    pub algorithms: Vec<JwtAlgorithm>,
    /// A file holding the HS256 shared secret (its bytes, a final newline removed).
    pub secret_file: Option<PathBuf>,
    /// PEM public keys (`-----BEGIN PUBLIC KEY-----`, RSA or EC P-256; one or more), for
    /// RS256 and ES256 tokens signed by keys that do not change without a reload.
    pub public_key_file: Option<PathBuf>,
    /// The identity provider's JWKS (`https://idp.example/.well-known/jwks.json`), fetched
    /// in the background and refreshed; a token names its key by `kid`.
    pub jwks_url: Option<String>,
    /// CA certificates (PEM) the JWKS server's certificate is checked against. None: the
    /// system's CA store (what a public identity provider's certificate chains to).
    pub jwks_ca_file: Option<PathBuf>,
    /// How often the JWKS is fetched again. Default 5 minutes: providers publish a new key
    /// well before signing with it, so this only bounds how long a withdrawn key is still
    /// trusted (a token with an unknown `kid` triggers an early fetch anyway); at one small
    /// request per 5 minutes no provider rate-limits it.
    #[serde(with = "duration::seconds")]
    pub jwks_refresh: Duration,
    /// How long the last good keys stay valid while the JWKS cannot be fetched, counted from
    /// their fetch; after that JWKS tokens are refused. Default 1 hour: rides out a provider's
    /// maintenance or a network incident, yet a broker cut off from its provider stops
    /// trusting possibly withdrawn keys within the hour. At least `jwks_refresh`.
    #[serde(with = "duration::seconds")]
    pub jwks_max_stale: Duration,
    /// Longest one JWKS fetch may take (connect, TLS, answer). Default 5 seconds: a JWKS is a
    /// few kilobytes; a provider slower than that is treated as down and retried.
    #[serde(with = "duration::seconds")]
    pub jwks_timeout: Duration,
    /// Allow an `http://` JWKS URL to a host other than a loopback one. Default false: keys
    /// fetched in clear text can be replaced by anyone on the path, who could then sign
    /// tokens for any user.
    pub allow_insecure_http: bool,
    /// Accepted `aud` values; a token must name one of them. Empty (default): `aud` is not
    /// checked, for providers that do not set it; set it when one provider issues tokens for
    /// several services, or a token for another service gets in here.
    pub audience: Vec<String>,
    /// The required `iss`. Empty (default): not checked (a key source usually belongs to one
    /// issuer already).
    pub issuer: String,
    /// The claim that becomes the client's username (what the ACL file and the logs know it
    /// by). Default `"sub"`, the standard subject claim. Empty: CONNECT's username stays.
    pub username_claim: String,
    /// A claim the client id must equal (else CONNACK Not Authorized). Empty (default): not
    /// checked, since most providers have no such claim; set it so a token stolen from one
    /// device cannot be used under another's client id.
    pub client_id_claim: String,
    /// The claim with the client's topic rules, `{"pub": ["orders/#"], "sub":
    /// ["reply/%c/#"]}` (`%c`: client id, `%u`: username). Default `"acl"`. A token without
    /// it gets no rules of its own (the ACL file's apply alone); empty: never read.
    pub acl_claim: String,
    /// Clock difference tolerated on `exp` and `nbf`. Default 5 seconds: a token issued this
    /// second by a provider whose clock runs slightly ahead is not refused as "not yet
    /// valid", and an expired one lives only 5 s longer, little next to token lifetimes of
    /// minutes or hours. At most 5 minutes.
    #[serde(with = "duration::seconds")]
    pub leeway: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            token_field: TokenField::Password,
            algorithms: vec![
                JwtAlgorithm::Hs256,
                JwtAlgorithm::Rs256,
                JwtAlgorithm::Es256,
            ],
            secret_file: None,
            public_key_file: None,
            jwks_url: None,
            jwks_ca_file: None,
            jwks_refresh: Duration::from_secs(300),
            jwks_max_stale: Duration::from_secs(3600),
            jwks_timeout: Duration::from_secs(5),
            allow_insecure_http: false,
            audience: Vec::new(),
            issuer: String::new(),
            username_claim: "sub".into(),
            client_id_claim: String::new(),
            acl_claim: "acl".into(),
            leeway: Duration::from_secs(5),
        }
    }
}

/// Where a JWKS URL points, as far as the settings care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, `/` at least.
    pub path: String,
}

impl JwksUrl {
    /// `http://HOST[:PORT]/PATH` or `https://...`; IPv6 hosts in brackets.
    pub fn parse(url: &str) -> Result<JwksUrl, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{url:?}: give an https:// (or http://) URL")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{url:?} names no host"))?;
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(format!(
                "{url:?}: user information in the URL is not supported"
            ));
        }
        Ok(JwksUrl {
            tls,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            path: uri
                .path_and_query()
                .map_or("/".to_string(), |p| p.as_str().to_string()),
        })
    }

    /// `localhost`, 127.0.0.0/8 or `::1`: traffic that never leaves the machine (the same
    /// rule as `[auth.http]`'s URLs).
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.host)
    }
}

impl JwtConfig {
    /// Rules serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |key: &'static str, message: String| Err(ConfigError::Invalid { key, message });
        if self.algorithms.is_empty() {
            return invalid(
                "auth.jwt.algorithms",
                "must name at least one of \"HS256\", \"RS256\", \"ES256\"".into(),
            );
        }
        if self.secret_file.is_none() && self.public_key_file.is_none() && self.jwks_url.is_none() {
            return invalid(
                "auth.jwt",
                "needs a key source: secret_file, public_key_file or jwks_url".into(),
            );
        }
        let hs = self.algorithms.contains(&JwtAlgorithm::Hs256);
        let public = self.algorithms.contains(&JwtAlgorithm::Rs256)
            || self.algorithms.contains(&JwtAlgorithm::Es256);
        if self.secret_file.is_some() && !hs {
            return invalid(
                "auth.jwt.secret_file",
                "is an HS256 secret but auth.jwt.algorithms does not include \"HS256\"".into(),
            );
        }
        if self.secret_file.is_none() && !public {
            return invalid(
                "auth.jwt.algorithms",
                "only \"HS256\" is allowed but auth.jwt.secret_file is not set".into(),
            );
        }
        for (key, set) in [
            ("auth.jwt.public_key_file", self.public_key_file.is_some()),
            ("auth.jwt.jwks_url", self.jwks_url.is_some()),
        ] {
            if set && !public {
                return invalid(
                    key,
                    "holds public keys but auth.jwt.algorithms has neither \"RS256\" nor \"ES256\""
                        .into(),
                );
            }
        }
        match &self.jwks_url {
            Some(url) => {
                let parsed = JwksUrl::parse(url).map_err(|message| ConfigError::Invalid {
                    key: "auth.jwt.jwks_url",
                    message,
                })?;
                if !parsed.tls && !parsed.is_loopback() && !self.allow_insecure_http {
                    return invalid(
                        "auth.jwt.jwks_url",
                        format!(
                            "{url:?} is plain http to another machine: anyone on the path could \
                             replace the keys; use https://, or set auth.jwt.allow_insecure_http"
                        ),
                    );
                }
                if !parsed.tls && self.jwks_ca_file.is_some() {
                    return invalid(
                        "auth.jwt.jwks_ca_file",
                        "is set but auth.jwt.jwks_url is not https://".into(),
                    );
                }
            }
            None if self.jwks_ca_file.is_some() => {
                return invalid(
                    "auth.jwt.jwks_ca_file",
                    "is set but auth.jwt.jwks_url is not".into(),
                );
            }
            None => {}
        }
        if self.jwks_refresh < Duration::from_secs(10) {
            return invalid(
                "auth.jwt.jwks_refresh",
                "must be at least 10 s (identity providers rate-limit their JWKS)".into(),
            );
        }
        if self.jwks_max_stale < self.jwks_refresh {
            return invalid(
                "auth.jwt.jwks_max_stale",
                format!(
                    "must be at least auth.jwt.jwks_refresh ({}), else good keys would lapse \
                     between two successful fetches",
                    duration::display(self.jwks_refresh)
                ),
            );
        }
        if self.jwks_timeout < Duration::from_millis(100) || self.jwks_timeout > self.jwks_refresh {
            return invalid(
                "auth.jwt.jwks_timeout",
                "must be at least 100 ms and at most auth.jwt.jwks_refresh".into(),
            );
        }
        if self.audience.iter().any(String::is_empty) {
            return invalid(
                "auth.jwt.audience",
                "holds an empty string (an empty list means not checked)".into(),
            );
        }
        if self.token_field == TokenField::Username && self.username_claim.is_empty() {
            return invalid(
                "auth.jwt.username_claim",
                "must be set when auth.jwt.token_field = \"username\" (the username is the \
                 token itself)"
                    .into(),
            );
        }
        if self.leeway > Duration::from_secs(300) {
            return invalid("auth.jwt.leeway", "must be at most 5 minutes".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut JwtConfig)) -> Result<(), String> {
        let mut c = JwtConfig {
            jwks_url: Some("https://idp.example/jwks.json".into()),
            ..JwtConfig::default()
        };
        f(&mut c);
        c.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_with_a_key_source_are_valid() {
        assert_eq!(with(|_| {}), Ok(()));
        assert_eq!(
            with(|c| {
                c.jwks_url = None;
                c.secret_file = Some("s".into());
            }),
            Ok(())
        );
    }

    #[test]
    fn refusals_name_the_key() {
        for (case, key) in [
            (
                Box::new(|c: &mut JwtConfig| c.jwks_url = None) as Box<dyn FnOnce(&mut JwtConfig)>,
                "`auth.jwt`",
            ),
            (Box::new(|c| c.algorithms.clear()), "auth.jwt.algorithms"),
            (
                Box::new(|c| c.algorithms = vec![JwtAlgorithm::Hs256]),
                "auth.jwt.algorithms",
            ),
            (
                Box::new(|c| {
                    c.secret_file = Some("s".into());
                    c.algorithms = vec![JwtAlgorithm::Rs256];
                }),
                "auth.jwt.secret_file",
            ),
            (
                Box::new(|c| c.jwks_url = Some("ftp://x/y".into())),
                "auth.jwt.jwks_url",
            ),
            (
                Box::new(|c| c.jwks_url = Some("http://idp.example/jwks".into())),
                "auth.jwt.jwks_url",
            ),
            (
                Box::new(|c| c.jwks_url = Some("https://u:p@idp.example/jwks".into())),
                "auth.jwt.jwks_url",
            ),
            (
                Box::new(|c| {
                    c.jwks_url = Some("http://127.0.0.1:8080/jwks".into());
                    c.jwks_ca_file = Some("ca.pem".into());
                }),
                "auth.jwt.jwks_ca_file",
            ),
            (
                Box::new(|c| c.jwks_refresh = Duration::from_secs(1)),
                "auth.jwt.jwks_refresh",
            ),
            (
                Box::new(|c| c.jwks_max_stale = Duration::from_secs(60)),
                "auth.jwt.jwks_max_stale",
            ),
            (
                Box::new(|c| c.jwks_timeout = Duration::from_millis(10)),
                "auth.jwt.jwks_timeout",
            ),
            (
                Box::new(|c| c.audience = vec![String::new()]),
                "auth.jwt.audience",
            ),
            (
                Box::new(|c| {
                    c.token_field = TokenField::Username;
                    c.username_claim.clear();
                }),
                "auth.jwt.username_claim",
            ),
            (
                Box::new(|c| c.leeway = Duration::from_secs(600)),
                "auth.jwt.leeway",
            ),
        ] {
            let err = with(case).expect_err(key);
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        for url in [
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:9000/jwks",
        ] {
            assert_eq!(with(|c| c.jwks_url = Some(url.into())), Ok(()), "{url}");
        }
        assert_eq!(
            with(|c| {
                c.jwks_url = Some("http://idp.internal/jwks".into());
                c.allow_insecure_http = true;
            }),
            Ok(())
        );
    }

    #[test]
    fn urls_are_split() {
        let u = JwksUrl::parse("https://idp.example/.well-known/jwks.json?v=1").expect("url");
        assert_eq!(
            u,
            JwksUrl {
                tls: true,
                host: "idp.example".into(),
                port: 443,
                path: "/.well-known/jwks.json?v=1".into(),
            }
        );
        let u = JwksUrl::parse("http://[::1]:8080").expect("url");
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 8080, "/")
        );
        assert!(u.is_loopback());
    }

    /// `[auth.jwt]` is absent by default, so the configuration-wide docs check does not walk
    /// it: every key has its row here, with its default as that check would show it.
    #[test]
    fn every_key_is_documented_with_its_default() {
        let doc = include_str!("../../docs/configuration.md");
        let heading = "### `[auth.jwt]`";
        let start = doc.find(heading).expect("heading") + heading.len();
        let rest = &doc[start..];
        let section = &rest[..rest.find("\n#").unwrap_or(rest.len())];
        let value = toml::Value::try_from(JwtConfig::default()).expect("serialise");
        let mut keys: Vec<(String, Option<String>)> = value
            .as_table()
            .expect("table")
            .iter()
            .map(|(k, v)| {
                let shown = match v {
                    toml::Value::String(s) if s.is_empty() => Some("none".to_string()),
                    toml::Value::String(s) => Some(format!("`\"{s}\"`")),
                    toml::Value::Array(a) if a.is_empty() => Some("`[]`".into()),
                    toml::Value::Array(_) => None,
                    other => Some(format!("`{other}`")),
                };
                (k.clone(), shown)
            })
            .collect();
        for optional in ["secret_file", "public_key_file", "jwks_url", "jwks_ca_file"] {
            keys.push((optional.into(), Some("none".into())));
        }
        assert_eq!(keys.len(), 16);
        for (key, shown) in keys {
            let row = section
                .lines()
                .find(|l| l.starts_with(&format!("| `{key}`")))
                .unwrap_or_else(|| panic!("auth.jwt.{key}: no row"));
            if let Some(shown) = shown {
                assert!(
                    row.contains(&shown),
                    "auth.jwt.{key}: {shown} not in its row"
                );
            }
        }
    }

    #[test]
    fn reads_from_toml() {
        let c: JwtConfig = toml::from_str(
            r#"
            token_field = "username"
            algorithms = ["RS256", "ES256"]
            jwks_url = "https://idp.example/jwks"
            jwks_refresh = "10m"
            leeway = 0
            audience = ["mqtt"]
            "#,
        )
        .expect("parses");
        assert_eq!(c.token_field, TokenField::Username);
        assert_eq!(c.algorithms, [JwtAlgorithm::Rs256, JwtAlgorithm::Es256]);
        assert_eq!(c.jwks_refresh, Duration::from_secs(600));
        assert_eq!(c.leeway, Duration::ZERO);
        assert_eq!(c.username_claim, "sub");
        assert!(toml::from_str::<JwtConfig>("algorithms = [\"none\"]").is_err());
        assert!(toml::from_str::<JwtConfig>("bogus = 1").is_err());
    }
}
