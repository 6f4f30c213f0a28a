//! The JWT authentication backend: tokens in the password (or username) field (`[auth.jwt]`).
//!
//! A client presents a signed token (RFC 7519). [`Jwt::check`] runs on the CONNECT path, so it
//! does no I/O: the keys are in memory, read from files by [`Jwt::new`] or fetched from the
//! identity provider's JWKS by [`Jwt::run_refresh`], a background task. A token is checked by
//! jsonwebtoken (signature, `alg`, `aud`, `iss`, `exp` present); `exp` and `nbf` are compared
//! here with the time the caller passes in, so the connection core's rule "time is passed in"
//! holds and tests need no clock.
//!
//! What passes and what is refused:
//! - The field holds no token (absent, not UTF-8, not three base64url parts whose first is a
//!   JSON header naming an `alg`): [`Decision::Pass`], the next backend asks. A password such
//!   as `v1.2.3` passes too: its first part is no header.
//! - A token that fails (signature, algorithm not allowed, unknown key, expired, not yet
//!   valid, wrong audience or issuer, missing or malformed claims): Bad Credentials.
//! - A token whose client id claim does not name the CONNECT's client id: Not Authorized.
//!
//! Keys come only from the configuration: a token's own `jku`, `jwk` or `x5u` header is never
//! followed (that would let the token choose who vouches for it), and a key is used only for
//! its own algorithm (an RSA public key is never taken as an HMAC secret). A token naming a
//! `kid` the JWKS does not hold wakes the refresh task early, rate-limited, which is how
//! identity providers expect a key rotation to be picked up. When the JWKS cannot be fetched
//! the last good keys stay valid for `jwks_max_stale` after their fetch, then tokens signed by
//! them are refused until a fetch succeeds; each change of that state is logged once.

use super::chain::{ClaimRules, Credentials, Decision, Denial, Grant};
use crate::config::auth_jwt::{JwksUrl, JwtAlgorithm, JwtConfig, TokenField};
use crate::config::duration;
use crate::protocol::validate::is_valid_topic_filter;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{header, Request, StatusCode};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Notify};

/// After a failed fetch the next try comes this soon (or at `jwks_refresh`, if sooner), so a
/// short outage ends long before `jwks_max_stale`.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// An unknown `kid` fetches the JWKS early, but not sooner than this after the last fetch:
/// tokens with made-up `kid`s must not turn the broker into a load generator against the
/// identity provider.
const EARLY_REFRESH_MIN: Duration = Duration::from_secs(30);
/// Largest JWKS answer read; real ones are a few kilobytes.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// How long the connection of a fetch waits in the pool for the next: long enough for the
/// early fetch an unknown `kid` brings (at least 30 s after the last), shorter than the
/// regular `jwks_refresh` (5 min by default), after which a fresh connection is cheaper than
/// one the provider's load balancer may have dropped meanwhile.
const JWKS_POOL_IDLE: Duration = Duration::from_secs(60);
/// RFC 7518 3.2: an HS256 key must be at least as long as the hash output.
const MIN_SECRET_BYTES: usize = 32;

/// Why the backend cannot be built from its settings (the broker does not start; a reload
/// keeps the previous backend), or why a JWKS fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("{key} {}: {source}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "auth.jwt.secret_file {}: the secret has {len} bytes; HS256 needs at least {MIN_SECRET_BYTES} (RFC 7518)",
        path.display()
    )]
    ShortSecret { path: PathBuf, len: usize },
    #[error("auth.jwt.public_key_file {}: {message}", path.display())]
    PublicKey { path: PathBuf, message: String },
    #[error("auth.jwt.jwks_url: {0}")]
    Url(String),
    #[error("auth.jwt.jwks_ca_file: {0}")]
    CaFile(String),
    #[error("auth.jwt.jwks_url: the system's CA store holds no certificate ({0}); set auth.jwt.jwks_ca_file")]
    NoRoots(String),
    #[error("JWKS {url}: {message}")]
    Fetch { url: String, message: String },
}

/// A verification key and the one algorithm it verifies.
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Keys of one successful JWKS fetch.
struct KeySet {
    keys: Vec<Key>,
    fetched_at: SystemTime,
}

/// The JWKS source: where it is, how it is fetched, and the last good keys.
struct Jwks {
    url: String,
    uri: hyper::Uri,
    /// The auth backends' client (`client.rs`): its idle connection to the JWKS host is
    /// reused by the next fetch when it comes within the pool's idle time.
    client: super::client::Client,
    refresh: Duration,
    max_stale: Duration,
    timeout: Duration,
    early_min: Duration,
    keys: RwLock<Option<Arc<KeySet>>>,
    /// The last `kid` a token named that the keys did not hold, and the refresh task's wake
    /// for it. The task fetches early only if the keys still lack that `kid` when it wakes: a
    /// wake left over from before the last fetch (tokens checked while it ran) costs nothing.
    wanted: Mutex<Option<String>>,
    wake: Notify,
    failures: AtomicU64,
}

impl Jwks {
    fn current(&self) -> Option<Arc<KeySet>> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A token named `kid`, which the keys do not hold: ask the refresh task for a fetch.
    fn want(&self, kid: &str) {
        *self.wanted.lock().unwrap_or_else(PoisonError::into_inner) = Some(kid.to_string());
        self.wake.notify_one();
    }

    /// Whether the `kid` last asked for is still missing from the keys.
    fn still_wanted(&self) -> bool {
        let Some(kid) = self
            .wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return false;
        };
        !self.current().is_some_and(|s| {
            s.keys
                .iter()
                .any(|k| k.kid.as_deref() == Some(kid.as_str()))
        })
    }

    /// Whether keys fetched at `fetched_at` may still be used at `now`.
    fn usable(&self, set: &KeySet, now: SystemTime) -> bool {
        now.duration_since(set.fetched_at)
            .map_or(true, |age| age <= self.max_stale)
    }
}

/// The JWT backend, built from `[auth.jwt]`.
pub struct Jwt {
    field: TokenField,
    /// One per allowed algorithm: jsonwebtoken checks a key against every algorithm of a
    /// validation, so each algorithm gets its own.
    validations: Vec<(Algorithm, Validation)>,
    leeway: f64,
    username_claim: String,
    client_id_claim: String,
    acl_claim: String,
    /// Keys from `secret_file` and `public_key_file`.
    files: Vec<Key>,
    jwks: Option<Jwks>,
}

/// Why a token was refused (for the debug log; the client learns only the reason code).
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("header: {0}")]
    Header(jsonwebtoken::errors::Error),
    #[error("algorithm {0:?} is not allowed")]
    Algorithm(Algorithm),
    #[error("no key for {0:?}")]
    NoKey(Algorithm),
    #[error("unknown kid {0:?}")]
    UnknownKid(String),
    #[error("the JWKS keys are older than auth.jwt.jwks_max_stale (the JWKS cannot be fetched)")]
    Stale,
    #[error("the JWKS has not been fetched yet (auth.jwt.jwks_url does not answer)")]
    Unfetched,
    #[error("{0}")]
    Token(jsonwebtoken::errors::Error),
    #[error("expired")]
    Expired,
    #[error("not valid yet (nbf)")]
    NotYetValid,
    #[error("claim {0}")]
    Claim(String),
    #[error("client id claim {claim:?} does not name the client id")]
    ClientId { claim: String },
}

impl Refused {
    fn denial(&self) -> Denial {
        match self {
            Refused::ClientId { .. } => Denial::NotAuthorized,
            // Not the token's fault: the keys to judge it are missing. The client is told to
            // come back (0x88), not that its token is bad (0x86).
            Refused::Stale | Refused::Unfetched => Denial::Unavailable,
            _ => Denial::BadCredentials,
        }
    }
}

fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::Hs256 => Algorithm::HS256,
        JwtAlgorithm::Rs256 => Algorithm::RS256,
        JwtAlgorithm::Es256 => Algorithm::ES256,
    }
}

/// jsonwebtoken's checks for tokens of `alg`: signature, `alg`, `exp` present, `aud` and `iss`
/// when configured (then also required: the crate skips an absent claim otherwise). `exp`
/// and `nbf` are compared by [`Jwt::check`] with the time it is given.
fn validation(alg: Algorithm, cfg: &JwtConfig) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = 0;
    v.validate_exp = false;
    v.validate_nbf = false;
    let mut required = vec!["exp"];
    if cfg.audience.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&cfg.audience);
        required.push("aud");
    }
    if !cfg.issuer.is_empty() {
        v.set_issuer(&[cfg.issuer.as_str()]);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    v
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, JwtError> {
    std::fs::read(path).map_err(|source| JwtError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

/// The HS256 secret: the file's bytes, a final newline removed (as an editor leaves it).
fn read_secret(path: &Path) -> Result<Vec<u8>, JwtError> {
    let mut secret = read("auth.jwt.secret_file", path)?;
    if secret.last() == Some(&b'\n') {
        secret.pop();
        if secret.last() == Some(&b'\r') {
            secret.pop();
        }
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(JwtError::ShortSecret {
            path: path.to_path_buf(),
            len: secret.len(),
        });
    }
    Ok(secret)
}

/// Every PEM public key in the file, RSA (RS256) or EC (ES256).
fn read_public_keys(path: &Path, allowed: &[Algorithm]) -> Result<Vec<Key>, JwtError> {
    let err = |message: String| JwtError::PublicKey {
        path: path.to_path_buf(),
        message,
    };
    let text = read("auth.jwt.public_key_file", path)?;
    let blocks = pem::parse_many(&text).map_err(|e| err(e.to_string()))?;
    if blocks.is_empty() {
        return Err(err("no PEM block (-----BEGIN PUBLIC KEY-----)".into()));
    }
    let mut keys = Vec::with_capacity(blocks.len());
    for (i, block) in blocks.iter().enumerate() {
        let n = i + 1;
        if !matches!(block.tag(), "PUBLIC KEY" | "RSA PUBLIC KEY") {
            return Err(err(format!(
                "block {n} is a {}; give public keys only (-----BEGIN PUBLIC KEY-----)",
                block.tag()
            )));
        }
        let one = pem::encode(block);
        let (alg, key) = match DecodingKey::from_rsa_pem(one.as_bytes()) {
            Ok(key) => (Algorithm::RS256, key),
            Err(_) => match DecodingKey::from_ec_pem(one.as_bytes()) {
                Ok(key) => (Algorithm::ES256, key),
                Err(e) => {
                    return Err(err(format!(
                        "block {n} is neither an RSA nor an EC public key: {e}"
                    )))
                }
            },
        };
        if !allowed.contains(&alg) {
            return Err(err(format!(
                "block {n} is a key for {alg:?}, which auth.jwt.algorithms does not allow"
            )));
        }
        keys.push(Key {
            kid: None,
            alg,
            key,
        });
    }
    Ok(keys)
}

/// Whether `token` has a JWT's shape: three base64url parts, the first a JSON object naming
/// an `alg`. Anything else is not this backend's kind of credentials.
fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(head), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let base64url = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if head.is_empty()
        || payload.is_empty()
        || ![head, payload, signature].into_iter().all(base64url)
    {
        return false;
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head)
        .is_ok_and(|json| {
            serde_json::from_slice::<Map<String, Value>>(&json)
                .is_ok_and(|head| head.get("alg").is_some_and(Value::is_string))
        })
}

/// `filter` with `%c` and `%u` replaced in one pass (replaced text is never read again, so a
/// client id containing `%u` stays literal). `None`: the filter grants nothing to this client:
/// it names `%u` and there is no username, a replacement would bring a wildcard (a client id
/// `+` must not turn `reply/%c/#` into `reply/+/#`), or the result is no valid filter.
fn substitute(filter: &str, client_id: &str, username: Option<&str>) -> Option<String> {
    let mut out = String::with_capacity(filter.len() + client_id.len());
    let mut rest = filter;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let value = match after.as_bytes().first() {
            Some(b'c') => client_id,
            Some(b'u') => username?,
            _ => {
                out.push('%');
                rest = after;
                continue;
            }
        };
        if value.contains(['+', '#']) {
            return None;
        }
        out.push_str(value);
        rest = &after[1..];
    }
    out.push_str(rest);
    is_valid_topic_filter(&out).then_some(out)
}

/// A claim's `{"pub": [...], "sub": [...]}`; any other shape is refused, since a token whose
/// rules cannot be read must not get the ACL file's rules alone.
fn claim_rules(
    value: &Value,
    client_id: &str,
    username: Option<&str>,
) -> Result<ClaimRules, String> {
    let Value::Object(map) = value else {
        return Err("is not an object".into());
    };
    let list = |key: &str| -> Result<Vec<String>, String> {
        match map.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    let filter = item
                        .as_str()
                        .ok_or_else(|| format!("{key:?} holds a non-string"))?;
                    out.extend(substitute(filter, client_id, username));
                }
                Ok(out)
            }
            Some(_) => Err(format!("{key:?} is not a list")),
        }
    };
    Ok(ClaimRules {
        publish: list("pub")?,
        subscribe: list("sub")?,
    })
}

fn seconds_since_epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Errors tied to the key tried rather than to the token: the next candidate key is tried.
fn key_specific(e: &jsonwebtoken::errors::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::InvalidSignature
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::Crypto(_)
    )
}

impl Jwt {
    /// Reads the key files and prepares the JWKS source (fetched by [`Jwt::run_refresh`] or
    /// [`Jwt::refresh`]; until then only file keys verify). `cfg` is validated already.
    pub fn new(cfg: &JwtConfig) -> Result<Jwt, JwtError> {
        let mut allowed: Vec<Algorithm> = Vec::new();
        for a in cfg.algorithms.iter().copied().map(algorithm) {
            if !allowed.contains(&a) {
                allowed.push(a);
            }
        }
        let mut files = Vec::new();
        if let Some(path) = &cfg.secret_file {
            files.push(Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(&read_secret(path)?),
            });
        }
        if let Some(path) = &cfg.public_key_file {
            files.extend(read_public_keys(path, &allowed)?);
        }
        let jwks = match &cfg.jwks_url {
            Some(url) => {
                let target = JwksUrl::parse(url).map_err(JwtError::Url)?;
                let uri = url
                    .parse::<hyper::Uri>()
                    .map_err(|e| JwtError::Url(e.to_string()))?;
                let client = super::client::build(&super::client::Settings {
                    ca_file: cfg.jwks_ca_file.as_deref(),
                    https: target.tls,
                    connect_timeout: cfg.jwks_timeout,
                    pool_idle: JWKS_POOL_IDLE,
                    pool_max_idle: 1,
                })
                .map_err(|e| match e {
                    super::client::ClientError::CaFile(e) => JwtError::CaFile(e.to_string()),
                    super::client::ClientError::NoRoots(e) => JwtError::NoRoots(e.to_string()),
                })?;
                Some(Jwks {
                    url: url.clone(),
                    uri,
                    client,
                    refresh: cfg.jwks_refresh,
                    max_stale: cfg.jwks_max_stale,
                    timeout: cfg.jwks_timeout,
                    early_min: EARLY_REFRESH_MIN,
                    keys: RwLock::new(None),
                    wanted: Mutex::new(None),
                    wake: Notify::new(),
                    failures: AtomicU64::new(0),
                })
            }
            None => None,
        };
        Ok(Jwt {
            field: cfg.token_field,
            validations: allowed.iter().map(|&a| (a, validation(a, cfg))).collect(),
            leeway: cfg.leeway.as_secs_f64(),
            username_claim: cfg.username_claim.clone(),
            client_id_claim: cfg.client_id_claim.clone(),
            acl_claim: cfg.acl_claim.clone(),
            files,
            jwks,
        })
    }

    /// Takes over the keys `previous` fetched from the same JWKS URL, so a reload (a new
    /// `Jwt` from a changed configuration) does not refuse JWKS tokens until its first fetch.
    pub fn carry_over(&self, previous: &Jwt) {
        let (Some(new), Some(old)) = (&self.jwks, &previous.jwks) else {
            return;
        };
        if new.url != old.url {
            return;
        }
        let mut keys = new.keys.write().unwrap_or_else(PoisonError::into_inner);
        if keys.is_none() {
            *keys = old.current();
        }
    }

    /// Whether a JWKS is configured (then [`Jwt::run_refresh`] has work to do).
    pub fn has_jwks(&self) -> bool {
        self.jwks.is_some()
    }

    /// Failed JWKS fetches since this backend was built (for a metric).
    pub fn refresh_failures(&self) -> u64 {
        self.jwks
            .as_ref()
            .map_or(0, |j| j.failures.load(Ordering::Relaxed))
    }

    /// CONNECT's credentials at `now`: Pass when the chosen field holds no token, Deny when it
    /// holds a token that fails, Allow with the username, rules and expiry the token gives.
    /// No I/O: an unknown `kid` only wakes the refresh task.
    pub fn check(&self, c: &Credentials<'_>, now: SystemTime) -> Decision {
        let token = match self.field {
            TokenField::Password => c.password.and_then(|p| std::str::from_utf8(p).ok()),
            TokenField::Username => c.username,
        };
        let Some(token) = token.filter(|t| looks_like_jwt(t)) else {
            return Decision::Pass;
        };
        match self
            .verify(token, now)
            .and_then(|(claims, exp)| self.grant(c, &claims, exp))
        {
            Ok(grant) => Decision::Allow(grant),
            Err(refused) => {
                tracing::debug!(
                    client_id = c.client_id,
                    listener = c.listener,
                    reason = %refused,
                    "JWT refused"
                );
                Decision::Deny(refused.denial())
            }
        }
    }

    /// The token's claims and `exp`, once a configured key verifies it and its times hold.
    fn verify(&self, token: &str, now: SystemTime) -> Result<(Map<String, Value>, f64), Refused> {
        let header = jsonwebtoken::decode_header(token).map_err(Refused::Header)?;
        let alg = header.alg;
        let validation = self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, v)| v)
            .ok_or(Refused::Algorithm(alg))?;
        let kid = header.kid.as_deref();
        let set = self.jwks.as_ref().and_then(Jwks::current);
        let fresh = match (&self.jwks, &set) {
            (Some(jwks), Some(s)) => jwks.usable(s, now),
            _ => false,
        };
        let mut candidates: Vec<&Key> = Vec::new();
        if let (true, Some(s)) = (fresh, &set) {
            candidates.extend(
                s.keys
                    .iter()
                    .filter(|k| k.alg == alg && (kid.is_none() || k.kid.as_deref() == kid)),
            );
        }
        let from_jwks = candidates.len();
        candidates.extend(self.files.iter().filter(|k| k.alg == alg));
        let mut last = None;
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
                Ok(data) => return self.times(data.claims, now),
                Err(e) if key_specific(&e) => last = Some(e),
                Err(e) => return Err(Refused::Token(e)),
            }
        }
        // No key verified. A JWKS holds only RS256 and ES256 keys, so only those tokens are
        // its business: a `kid` it does not hold may be a new key (wake the refresh task,
        // which rate-limits), and a JWKS with no candidate says why.
        let Some(jwks) = self.jwks.as_ref().filter(|_| alg != Algorithm::HS256) else {
            return Err(last.map_or(Refused::NoKey(alg), Refused::Token));
        };
        if let Some(kid) = kid {
            let known = set
                .as_ref()
                .is_some_and(|s| s.keys.iter().any(|k| k.kid.as_deref() == Some(kid)));
            if !known {
                jwks.want(kid);
            }
        }
        let stale = set.is_some() && !fresh;
        Err(match (from_jwks, kid) {
            (0, _) if stale => Refused::Stale,
            // No key file verified it either (it would have returned above).
            (0, _) if set.is_none() => Refused::Unfetched,
            (0, Some(kid)) => Refused::UnknownKid(kid.to_string()),
            _ => last.map_or(Refused::NoKey(alg), Refused::Token),
        })
    }

    /// `exp` (present: jsonwebtoken required it) and `nbf` against `now`, with the leeway.
    fn times(
        &self,
        claims: Map<String, Value>,
        now: SystemTime,
    ) -> Result<(Map<String, Value>, f64), Refused> {
        let now = seconds_since_epoch(now);
        let exp = claims
            .get("exp")
            .and_then(Value::as_f64)
            .ok_or_else(|| Refused::Claim("exp is not a number".into()))?;
        if now >= exp + self.leeway {
            return Err(Refused::Expired);
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf
                .as_f64()
                .ok_or_else(|| Refused::Claim("nbf is not a number".into()))?;
            if now + self.leeway < nbf {
                return Err(Refused::NotYetValid);
            }
        }
        Ok((claims, exp))
    }

    /// What the verified claims establish: username, client id binding, topic rules, expiry.
    fn grant(
        &self,
        c: &Credentials<'_>,
        claims: &Map<String, Value>,
        exp: f64,
    ) -> Result<Grant, Refused> {
        let username: Option<Arc<str>> = if self.username_claim.is_empty() {
            None
        } else {
            match claims.get(&self.username_claim).and_then(Value::as_str) {
                Some(name) if !name.is_empty() => Some(name.into()),
                _ => {
                    return Err(Refused::Claim(format!(
                        "{:?} (the username) is missing or not a string",
                        self.username_claim
                    )))
                }
            }
        };
        if !self.client_id_claim.is_empty()
            && claims.get(&self.client_id_claim).and_then(Value::as_str) != Some(c.client_id)
        {
            return Err(Refused::ClientId {
                claim: self.client_id_claim.clone(),
            });
        }
        let effective_user = match (&username, self.field) {
            (Some(u), _) => Some(&**u),
            (None, TokenField::Password) => c.username,
            (None, TokenField::Username) => None,
        };
        let rules = match claims.get(&self.acl_claim) {
            Some(value) if !self.acl_claim.is_empty() => Some(Arc::new(
                claim_rules(value, c.client_id, effective_user)
                    .map_err(|e| Refused::Claim(format!("{:?} {e}", self.acl_claim)))?,
            )),
            _ => None,
        };
        let expires_at = Duration::try_from_secs_f64(exp + self.leeway)
            .ok()
            .and_then(|d| UNIX_EPOCH.checked_add(d));
        Ok(Grant {
            username,
            rules,
            expires_at,
        })
    }

    /// Fetches the JWKS once and installs its keys as fetched at `now`. On failure the last
    /// good keys stay (and count toward `jwks_max_stale` from their own fetch). Returns the
    /// number of usable keys. The lead may await it once at startup so JWKS tokens work from
    /// the first CONNECT; [`Jwt::run_refresh`] calls it on its schedule.
    pub async fn refresh(&self, now: SystemTime) -> Result<usize, JwtError> {
        let Some(jwks) = &self.jwks else {
            return Ok(0);
        };
        let allowed: Vec<Algorithm> = self.validations.iter().map(|(a, _)| *a).collect();
        let fetched = match tokio::time::timeout(jwks.timeout, fetch(jwks)).await {
            Ok(answer) => answer.and_then(|body| parse_jwks(&body, &allowed)),
            Err(_) => Err(format!(
                "no answer within {} (auth.jwt.jwks_timeout)",
                duration::display(jwks.timeout)
            )),
        };
        match fetched {
            Ok(keys) => {
                let n = keys.len();
                *jwks.keys.write().unwrap_or_else(PoisonError::into_inner) =
                    Some(Arc::new(KeySet {
                        keys,
                        fetched_at: now,
                    }));
                Ok(n)
            }
            Err(message) => {
                jwks.failures.fetch_add(1, Ordering::Relaxed);
                Err(JwtError::Fetch {
                    url: jwks.url.clone(),
                    message,
                })
            }
        }
    }

    /// Keeps the JWKS fresh until `shutdown` changes (or its sender is dropped): a fetch at
    /// once, then every `jwks_refresh`; after a failure again within 30 s; early (at most
    /// every 30 s) when a token names an unknown `kid`. Returns at once without a JWKS.
    pub async fn run_refresh(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(jwks) = &self.jwks else {
            return;
        };
        let mut health = Health::Start;
        // Keys already there (fetched at start, or carried over a reload from the same URL)
        // are fresh: the first fetch waits its turn instead of asking again at once.
        let mut have_keys = jwks.current().is_some();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let started = tokio::time::Instant::now();
            let ok = if std::mem::take(&mut have_keys) {
                health = Health::Fresh;
                true
            } else {
                let result = self.refresh(SystemTime::now()).await;
                let ok = result.is_ok();
                health = self.report(health, result, SystemTime::now());
                ok
            };
            let wait = if ok {
                jwks.refresh
            } else {
                jwks.refresh.min(RETRY_AFTER_FAILURE)
            };
            let next = started + wait;
            let mut until = next;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = jwks.wake.notified(), if until == next => {
                        if jwks.still_wanted() {
                            until = (started + jwks.early_min).min(next);
                        }
                    }
                    _ = shutdown.changed() => return,
                }
            }
        }
    }

    /// Logs a fetch's outcome, once per change of state; returns the new state.
    fn report(&self, was: Health, result: Result<usize, JwtError>, now: SystemTime) -> Health {
        let Some(jwks) = &self.jwks else {
            return was;
        };
        let url = jwks.url.as_str();
        match result {
            Ok(keys) => {
                match was {
                    Health::Fresh => tracing::debug!(url, keys, "JWKS refreshed"),
                    Health::Start => tracing::info!(url, keys, "JWKS fetched"),
                    _ => tracing::info!(
                        url,
                        keys,
                        "JWKS fetched again; tokens signed by its keys are accepted"
                    ),
                }
                Health::Fresh
            }
            Err(e) => {
                let set = jwks.current();
                let now_state = match &set {
                    None => Health::Missing,
                    Some(s) if jwks.usable(s, now) => Health::Stale,
                    Some(_) => Health::Expired,
                };
                if now_state == was {
                    tracing::debug!(url, error = %e, "JWKS refresh failed again");
                    return now_state;
                }
                match (&now_state, &set) {
                    (Health::Stale, Some(s)) => {
                        let left = (s.fetched_at + jwks.max_stale)
                            .duration_since(now)
                            .unwrap_or_default();
                        tracing::warn!(
                            url,
                            error = %e,
                            valid_for = %duration::display(Duration::from_secs(left.as_secs())),
                            "JWKS refresh failed; the last good keys stay valid (auth.jwt.jwks_max_stale)"
                        );
                    }
                    (Health::Expired, _) => tracing::error!(
                        url,
                        error = %e,
                        "JWKS refresh still failing and the last good keys are older than \
                         auth.jwt.jwks_max_stale: tokens signed by them are refused"
                    ),
                    _ => tracing::warn!(
                        url,
                        error = %e,
                        "JWKS cannot be fetched: tokens signed by its keys are refused until it is"
                    ),
                }
                now_state
            }
        }
    }
}

/// The JWKS source's state, for logging each change once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Start,
    Fresh,
    /// Failing, the last good keys still in use.
    Stale,
    /// Failing, the last good keys too old.
    Expired,
    /// Failing, never fetched.
    Missing,
}

/// One GET of the JWKS through the auth backends' client (`client.rs`). The caller bounds
/// it with `jwks_timeout`; dropping the future at that deadline cancels the request, and a
/// connection left mid-answer is closed rather than pooled.
async fn fetch(jwks: &Jwks) -> Result<Bytes, String> {
    let request = Request::get(jwks.uri.clone())
        .header(header::ACCEPT, "application/jwk-set+json, application/json")
        .header(
            header::USER_AGENT,
            concat!("tern/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::default())
        .map_err(|e| format!("request: {e}"))?;
    let answer = jwks
        .client
        .request(request)
        .await
        .map_err(|e| super::client::error_chain(&e))?;
    if answer.status() != StatusCode::OK {
        return Err(format!("HTTP status {}", answer.status()));
    }
    Limited::new(answer.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|e| format!("reading the answer: {e}"))
}

/// The usable keys of a JWKS document: signing keys for an allowed algorithm, RSA (RS256) or
/// EC P-256 (ES256). Other keys (encryption keys, other curves and algorithms, symmetric
/// keys, what jsonwebtoken cannot read) are skipped, so one odd key does not lose the rest;
/// a set with no usable key is a failure (the last good keys stay).
fn parse_jwks(body: &[u8], allowed: &[Algorithm]) -> Result<Vec<Key>, String> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<Value>,
    }
    let set: Set = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let total = set.keys.len();
    let keys: Vec<Key> = set
        .keys
        .into_iter()
        .filter_map(|v| jwk_key(v, allowed))
        .collect();
    if keys.is_empty() {
        let algs: Vec<String> = allowed
            .iter()
            .filter(|a| **a != Algorithm::HS256)
            .map(|a| format!("{a:?}"))
            .collect();
        return Err(format!(
            "none of its {total} keys is a signing key for {}",
            algs.join(" or ")
        ));
    }
    Ok(keys)
}

fn jwk_key(value: Value, allowed: &[Algorithm]) -> Option<Key> {
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let alg = match (&jwk.algorithm, &jwk.common.key_algorithm) {
        (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
        (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
            if p.curve == EllipticCurve::P256 =>
        {
            Algorithm::ES256
        }
        _ => return None,
    };
    if !allowed.contains(&alg) {
        return None;
    }
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some(Key {
        kid: jwk.common.key_id,
        alg,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use hyper_util::rt::TokioIo;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    const NOW: u64 = 1_700_000_000;
    const SECRET: &[u8] = b"a shared secret of at least 32 bytes, for tests";

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name)
    }

    fn read_fixture(name: &str) -> Vec<u8> {
        std::fs::read(fixture(name)).expect("fixture")
    }

    /// A fresh directory for one test's files.
    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tern-jwt-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write");
        path
    }

    /// A backend with the shared secret and both public keys (RSA and EC) in one file.
    fn file_config(tag: &str) -> JwtConfig {
        let dir = temp_dir(tag);
        let mut secret = SECRET.to_vec();
        secret.push(b'\n');
        let mut keys = read_fixture("rsa1.pub");
        keys.extend(read_fixture("ec1.pub"));
        JwtConfig {
            secret_file: Some(write(&dir, "secret", &secret)),
            public_key_file: Some(write(&dir, "keys.pem", &keys)),
            ..JwtConfig::default()
        }
    }

    fn sign_with(alg: Algorithm, key_file: &str, kid: Option<&str>, claims: &Value) -> String {
        let key = match alg {
            Algorithm::HS256 => EncodingKey::from_secret(SECRET),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&read_fixture(key_file)).expect("EC key"),
            _ => EncodingKey::from_rsa_pem(&read_fixture(key_file)).expect("RSA key"),
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        encode(&header, claims, &key).expect("sign")
    }

    fn sign(alg: Algorithm, claims: &Value) -> String {
        let key = match alg {
            Algorithm::ES256 => "ec1.key",
            _ => "rsa1.key",
        };
        sign_with(alg, key, None, claims)
    }

    fn claims() -> Value {
        json!({"sub": "alice", "exp": NOW + 3600})
    }

    fn creds<'a>(
        client_id: &'a str,
        username: Option<&'a str>,
        password: Option<&'a [u8]>,
    ) -> Credentials<'a> {
        Credentials {
            client_id,
            username,
            password,
            listener: "tcp",
            peer: SocketAddr::from(([127, 0, 0, 1], 50000)),
            protocol: 5,
        }
    }

    fn with_password(jwt: &Jwt, token: &str, at: SystemTime) -> Decision {
        jwt.check(&creds("c1", None, Some(token.as_bytes())), at)
    }

    fn allowed(d: Decision) -> Grant {
        match d {
            Decision::Allow(g) => g,
            other => panic!("expected Allow, got {other:?}"),
        }
    }

    fn denied(d: &Decision) -> Option<Denial> {
        match d {
            Decision::Deny(why) => Some(*why),
            _ => None,
        }
    }

    #[test]
    fn hs256_rs256_and_es256_tokens_are_accepted() {
        let jwt = Jwt::new(&file_config("algs")).expect("backend");
        for alg in [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256] {
            let grant = allowed(with_password(&jwt, &sign(alg, &claims()), now()));
            assert_eq!(grant.username.as_deref(), Some("alice"), "{alg:?}");
            assert_eq!(grant.rules, None, "{alg:?}");
            // exp plus the 5 s leeway: the token is accepted until then, so it lives until then.
            assert_eq!(
                grant.expires_at,
                Some(UNIX_EPOCH + Duration::from_secs(NOW + 3605)),
                "{alg:?}"
            );
        }
    }

    #[test]
    fn what_is_not_a_token_passes() {
        let jwt = Jwt::new(&file_config("pass")).expect("backend");
        let token = sign(Algorithm::HS256, &claims());
        for password in [
            &b"hunter2"[..],
            b"v1.2.3",
            b"a.b.c",
            b"",
            b"x.y",
            b"\xff\xfe.a.b",
            b"eyJhbGciOiJIUzI1NiJ9.e30",
            b"eyJhbGciOiJIUzI1NiJ9.e30.sig.extra",
            b"eyJhbGciOiJIUzI1NiJ9=.e30.sig",
        ] {
            let d = jwt.check(&creds("c1", Some("bob"), Some(password)), now());
            assert!(matches!(d, Decision::Pass), "{password:?}: {d:?}");
        }
        assert!(matches!(
            jwt.check(&creds("c1", Some("bob"), None), now()),
            Decision::Pass
        ));
        // A token in the username is not looked at in password mode.
        assert!(matches!(
            jwt.check(&creds("c1", Some(&token), Some(b"x")), now()),
            Decision::Pass
        ));
        // A JWT's shape with a header naming an algorithm is a token, and this one fails.
        assert!(looks_like_jwt("eyJhbGciOiJub25lIn0.e30."));
        let unsigned = jwt.check(&creds("c1", None, Some(b"eyJhbGciOiJub25lIn0.e30.")), now());
        assert_eq!(denied(&unsigned), Some(Denial::BadCredentials));
    }

    #[test]
    fn exp_and_nbf_hold_with_the_leeway() {
        let jwt = Jwt::new(&file_config("times")).expect("backend");
        let at =
            |claims: Value, t: SystemTime| with_password(&jwt, &sign(Algorithm::HS256, &claims), t);
        let ok = |d: Decision| matches!(d, Decision::Allow(_));
        assert!(ok(at(json!({"sub": "a", "exp": NOW - 4}), now())));
        assert!(!ok(at(json!({"sub": "a", "exp": NOW - 5}), now())));
        assert!(!ok(at(json!({"sub": "a", "exp": NOW - 3600}), now())));
        // The time passed in decides, not the clock.
        assert!(!ok(at(claims(), now() + Duration::from_secs(3605))));
        assert!(ok(at(claims(), now() + Duration::from_secs(3604))));
        assert!(ok(at(
            json!({"sub": "a", "exp": NOW + 60, "nbf": NOW + 5}),
            now()
        )));
        assert!(!ok(at(
            json!({"sub": "a", "exp": NOW + 60, "nbf": NOW + 6}),
            now()
        )));
        assert!(!ok(at(
            json!({"sub": "a", "exp": NOW + 60, "nbf": "soon"}),
            now()
        )));
        assert!(!ok(at(json!({"sub": "a"}), now())), "exp is required");
        assert!(!ok(at(json!({"sub": "a", "exp": "later"}), now())));
        assert!(ok(at(json!({"sub": "a", "exp": NOW as f64 + 10.5}), now())));

        let strict = Jwt::new(&JwtConfig {
            leeway: Duration::ZERO,
            ..file_config("times-strict")
        })
        .expect("backend");
        let token = sign(Algorithm::HS256, &json!({"sub": "a", "exp": NOW}));
        assert!(matches!(
            with_password(&strict, &token, now() - Duration::from_millis(1)),
            Decision::Allow(_)
        ));
        assert_eq!(
            denied(&with_password(&strict, &token, now())),
            Some(Denial::BadCredentials)
        );
    }

    #[test]
    fn audience_and_issuer_are_required_when_configured() {
        let jwt = Jwt::new(&JwtConfig {
            audience: vec!["mqtt".into(), "broker".into()],
            issuer: "https://idp.example".into(),
            ..file_config("aud")
        })
        .expect("backend");
        let check = |claims: Value| {
            matches!(
                with_password(&jwt, &sign(Algorithm::RS256, &claims), now()),
                Decision::Allow(_)
            )
        };
        let base = |aud: Value, iss: Value| {
            let mut c = claims();
            if !aud.is_null() {
                c["aud"] = aud;
            }
            if !iss.is_null() {
                c["iss"] = iss;
            }
            c
        };
        let iss = json!("https://idp.example");
        assert!(check(base(json!("mqtt"), iss.clone())));
        assert!(check(base(json!(["other", "broker"]), iss.clone())));
        assert!(!check(base(json!("other"), iss.clone())));
        assert!(!check(base(Value::Null, iss.clone())));
        assert!(!check(base(json!("mqtt"), json!("https://evil.example"))));
        assert!(!check(base(json!("mqtt"), Value::Null)));

        // Not configured: not checked, whatever the token says.
        let open = Jwt::new(&file_config("aud-open")).expect("backend");
        let token = sign(Algorithm::RS256, &base(json!("other"), json!("anyone")));
        assert!(matches!(
            with_password(&open, &token, now()),
            Decision::Allow(_)
        ));
    }

    #[test]
    fn a_wrong_signature_or_algorithm_is_refused() {
        let jwt = Jwt::new(&file_config("sig")).expect("backend");
        let bad = |token: &str| denied(&with_password(&jwt, token, now()));
        // Signed by a key the backend does not have.
        let other = sign_with(Algorithm::RS256, "rsa2.key", None, &claims());
        assert_eq!(bad(&other), Some(Denial::BadCredentials));
        // Another HMAC secret.
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(b"another secret of at least 32 bytes.."),
        )
        .expect("sign");
        assert_eq!(bad(&forged), Some(Denial::BadCredentials));
        // A payload changed after signing.
        let token = sign(Algorithm::ES256, &claims());
        let mut parts: Vec<&str> = token.split('.').collect();
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(json!({"sub": "root", "exp": NOW + 3600}).to_string());
        parts[1] = &payload;
        assert_eq!(bad(&parts.join(".")), Some(Denial::BadCredentials));
        // An algorithm jsonwebtoken knows but the backend does not allow.
        let rs384 = sign_with(Algorithm::RS384, "rsa1.key", None, &claims());
        assert_eq!(bad(&rs384), Some(Denial::BadCredentials));

        // The public key used as an HMAC secret (algorithm confusion): RS256 only.
        let rsa_only = Jwt::new(&JwtConfig {
            algorithms: vec![JwtAlgorithm::Rs256],
            public_key_file: Some(fixture("rsa1.pub")),
            ..JwtConfig::default()
        })
        .expect("backend");
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(&read_fixture("rsa1.pub")),
        )
        .expect("sign");
        assert_eq!(
            denied(&with_password(&rsa_only, &confused, now())),
            Some(Denial::BadCredentials)
        );
        let hs = sign(Algorithm::HS256, &claims());
        assert_eq!(
            denied(&with_password(&rsa_only, &hs, now())),
            Some(Denial::BadCredentials)
        );
        assert!(matches!(
            with_password(&rsa_only, &sign(Algorithm::RS256, &claims()), now()),
            Decision::Allow(_)
        ));
    }

    #[test]
    fn a_token_in_the_username() {
        let jwt = Jwt::new(&JwtConfig {
            token_field: TokenField::Username,
            ..file_config("username")
        })
        .expect("backend");
        let token = sign(Algorithm::ES256, &claims());
        let grant = allowed(jwt.check(&creds("c1", Some(&token), None), now()));
        assert_eq!(grant.username.as_deref(), Some("alice"));
        // The password is not looked at.
        assert!(matches!(
            jwt.check(&creds("c1", Some("alice"), Some(token.as_bytes())), now()),
            Decision::Pass
        ));
    }

    #[test]
    fn claims_map_to_username_and_rules() {
        let jwt = Jwt::new(&file_config("claims")).expect("backend");
        let token = sign(
            Algorithm::HS256,
            &json!({
                "sub": "alice",
                "exp": NOW + 60,
                "acl": {
                    "pub": ["orders/#", "devices/%c/status", "users/%u/#", "100%/x", "bad/#/x"],
                    "sub": ["reply/%c/#"],
                    "other": 1
                }
            }),
        );
        let check = |client_id: &str| {
            jwt.check(
                &creds(client_id, Some("ignored"), Some(token.as_bytes())),
                now(),
            )
        };
        let grant = allowed(check("dev1"));
        let rules = grant.rules.expect("rules");
        assert_eq!(
            rules.publish,
            ["orders/#", "devices/dev1/status", "users/alice/#", "100%/x"]
        );
        assert_eq!(rules.subscribe, ["reply/dev1/#"]);
        assert!(rules.can_subscribe("reply/dev1/+"));
        assert!(!rules.can_subscribe("reply/#"));
        // A client id with a wildcard gets nothing from rules naming %c; one with a slash
        // spans levels, as in the ACL file.
        let rules = allowed(check("+")).rules.expect("rules");
        assert_eq!(rules.publish, ["orders/#", "users/alice/#", "100%/x"]);
        assert!(rules.subscribe.is_empty());
        let rules = allowed(check("a/b")).rules.expect("rules");
        assert_eq!(rules.subscribe, ["reply/a/b/#"]);
        // Replaced text is not read again.
        let rules = allowed(check("%u")).rules.expect("rules");
        assert_eq!(rules.subscribe, ["reply/%u/#"]);

        // Malformed rules refuse the token rather than granting the ACL file's rules alone.
        for acl in [
            json!(["a"]),
            json!({"pub": "a/#"}),
            json!({"sub": [1]}),
            Value::Null,
        ] {
            let token = sign(
                Algorithm::HS256,
                &json!({"sub": "alice", "exp": NOW + 60, "acl": acl}),
            );
            assert_eq!(
                denied(&with_password(&jwt, &token, now())),
                Some(Denial::BadCredentials),
                "{acl}"
            );
        }
        // A username claim that is missing or not a string refuses the token.
        for sub in [Value::Null, json!(7), json!("")] {
            let mut c = json!({"exp": NOW + 60});
            if !sub.is_null() {
                c["sub"] = sub.clone();
            }
            let token = sign(Algorithm::HS256, &c);
            assert_eq!(
                denied(&with_password(&jwt, &token, now())),
                Some(Denial::BadCredentials),
                "{sub}"
            );
        }
    }

    #[test]
    fn without_a_username_claim_connects_username_stays() {
        let jwt = Jwt::new(&JwtConfig {
            username_claim: String::new(),
            acl_claim: "perms".into(),
            ..file_config("no-user-claim")
        })
        .expect("backend");
        let token = sign(
            Algorithm::HS256,
            &json!({"exp": NOW + 60, "perms": {"sub": ["u/%u/#"], "pub": ["x"]}, "acl": 5}),
        );
        let grant = allowed(jwt.check(&creds("c1", Some("bob"), Some(token.as_bytes())), now()));
        assert_eq!(grant.username, None);
        let rules = grant.rules.expect("rules");
        assert_eq!(rules.subscribe, ["u/bob/#"]);
        // Anonymous: rules naming %u grant nothing.
        let grant = allowed(jwt.check(&creds("c1", None, Some(token.as_bytes())), now()));
        assert_eq!(grant.rules.expect("rules").subscribe, Vec::<String>::new());
    }

    #[test]
    fn the_client_id_claim_must_name_the_client_id() {
        let jwt = Jwt::new(&JwtConfig {
            client_id_claim: "cid".into(),
            ..file_config("cid")
        })
        .expect("backend");
        let token = sign(
            Algorithm::RS256,
            &json!({"sub": "alice", "exp": NOW + 60, "cid": "dev1"}),
        );
        let at =
            |client_id: &str| jwt.check(&creds(client_id, None, Some(token.as_bytes())), now());
        assert!(matches!(at("dev1"), Decision::Allow(_)));
        assert_eq!(denied(&at("dev2")), Some(Denial::NotAuthorized));
        let no_claim = sign(Algorithm::RS256, &claims());
        assert_eq!(
            denied(&jwt.check(&creds("dev1", None, Some(no_claim.as_bytes())), now())),
            Some(Denial::NotAuthorized)
        );
    }

    #[test]
    fn key_files_are_checked_when_read() {
        let dir = temp_dir("files");
        let short = JwtConfig {
            secret_file: Some(write(&dir, "short", b"too short\n")),
            ..JwtConfig::default()
        };
        assert!(matches!(
            Jwt::new(&short),
            Err(JwtError::ShortSecret { len: 9, .. })
        ));
        let missing = JwtConfig {
            public_key_file: Some(dir.join("missing.pem")),
            ..JwtConfig::default()
        };
        let err = Jwt::new(&missing).err().expect("refused").to_string();
        assert!(err.starts_with("auth.jwt.public_key_file"), "{err}");
        for (name, bytes, says) in [
            ("private.pem", read_fixture("rsa1.key"), "PRIVATE KEY"),
            ("empty.pem", Vec::new(), "no PEM block"),
            (
                "junk.pem",
                b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_vec(),
                "block 1",
            ),
        ] {
            let cfg = JwtConfig {
                public_key_file: Some(write(&dir, name, &bytes)),
                ..JwtConfig::default()
            };
            let err = Jwt::new(&cfg).err().expect("refused").to_string();
            assert!(err.contains(says), "{name}: {err}");
        }
        let ec_not_allowed = JwtConfig {
            algorithms: vec![JwtAlgorithm::Rs256],
            public_key_file: Some(fixture("ec1.pub")),
            ..JwtConfig::default()
        };
        let err = Jwt::new(&ec_not_allowed)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("ES256"), "{err}");
    }

    /// A JWKS server on 127.0.0.1: answers every request with the status and body set.
    struct JwksServer {
        url: String,
        answer: Arc<Mutex<(u16, String)>>,
        hits: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl JwksServer {
        async fn start(body: String) -> JwksServer {
            JwksServer::start_with(body, None).await
        }

        async fn start_with(body: String, tls: Option<tokio_rustls::TlsAcceptor>) -> JwksServer {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let answer = Arc::new(Mutex::new((200, body)));
            let hits = Arc::new(AtomicUsize::new(0));
            let (a, h) = (Arc::clone(&answer), Arc::clone(&hits));
            let scheme = if tls.is_some() { "https" } else { "http" };
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (a, h, tls) = (Arc::clone(&a), Arc::clone(&h), tls.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req: Request<_>| {
                            assert_eq!(req.uri().path(), "/jwks");
                            h.fetch_add(1, Ordering::SeqCst);
                            let (status, body) = a.lock().expect("lock").clone();
                            async move {
                                hyper::Response::builder()
                                    .status(status)
                                    .body(Body::from(body))
                            }
                        });
                        let builder = hyper::server::conn::http1::Builder::new();
                        let _ = match tls {
                            Some(tls) => match tls.accept(stream).await {
                                Ok(s) => builder.serve_connection(TokioIo::new(s), service).await,
                                Err(_) => return,
                            },
                            None => {
                                builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await
                            }
                        };
                    });
                }
            });
            JwksServer {
                url: format!("{scheme}://127.0.0.1:{}/jwks", addr.port()),
                answer,
                hits,
                task,
            }
        }

        fn set(&self, status: u16, body: String) {
            *self.answer.lock().expect("lock") = (status, body);
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    impl Drop for JwksServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// A JWKS of fixture keys, each with its `kid`, and keys it must skip.
    fn jwks(keys: &[(&str, &str)]) -> String {
        let mut out: Vec<Value> = keys
            .iter()
            .map(|(file, kid)| {
                let mut k: Value =
                    serde_json::from_slice(&read_fixture(&format!("{file}.jwk"))).expect("jwk");
                k["kid"] = json!(kid);
                k["use"] = json!("sig");
                k
            })
            .collect();
        let mut enc: Value = serde_json::from_slice(&read_fixture("rsa2.jwk")).expect("jwk");
        enc["kid"] = json!("enc");
        enc["use"] = json!("enc");
        out.push(enc);
        out.push(json!({"kty": "oct", "kid": "sym", "k": "c2VjcmV0"}));
        out.push(json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}));
        out.push(json!({"kty": "RSA", "kid": "ps", "alg": "PS256", "n": "AQAB", "e": "AQAB"}));
        out.push(json!({"kty": "future", "kid": "x"}));
        json!({"keys": out}).to_string()
    }

    fn jwks_config(url: &str) -> JwtConfig {
        JwtConfig {
            jwks_url: Some(url.to_string()),
            jwks_refresh: Duration::from_secs(3600),
            jwks_timeout: Duration::from_secs(5),
            ..JwtConfig::default()
        }
    }

    #[tokio::test]
    async fn jwks_keys_verify_by_kid() {
        let server = JwksServer::start(jwks(&[("rsa1", "r1"), ("ec1", "e1")])).await;
        let jwt = Jwt::new(&jwks_config(&server.url)).expect("backend");
        let rs = sign_with(Algorithm::RS256, "rsa1.key", Some("r1"), &claims());
        // Not fetched yet: refused as unavailable, 0x88 (and no I/O on the way).
        assert_eq!(
            denied(&with_password(&jwt, &rs, now())),
            Some(Denial::Unavailable)
        );
        assert_eq!(jwt.refresh(now()).await.expect("fetched"), 2);
        assert!(matches!(
            with_password(&jwt, &rs, now()),
            Decision::Allow(_)
        ));
        let es = sign_with(Algorithm::ES256, "ec1.key", Some("e1"), &claims());
        assert!(matches!(
            with_password(&jwt, &es, now()),
            Decision::Allow(_)
        ));
        // Without a kid every key of the algorithm is tried.
        let no_kid = sign_with(Algorithm::RS256, "rsa1.key", None, &claims());
        assert!(matches!(
            with_password(&jwt, &no_kid, now()),
            Decision::Allow(_)
        ));
        // The right kid but another key, a kid the set does not hold, an encryption key.
        for (key, kid) in [("rsa2.key", "r1"), ("rsa1.key", "r9"), ("rsa2.key", "enc")] {
            let token = sign_with(Algorithm::RS256, key, Some(kid), &claims());
            assert_eq!(
                denied(&with_password(&jwt, &token, now())),
                Some(Denial::BadCredentials),
                "{key} {kid}"
            );
        }
        // HS256 is never verified with a JWKS key (the symmetric one is skipped).
        let hs = encode(
            &Header {
                kid: Some("sym".into()),
                ..Header::new(Algorithm::HS256)
            },
            &claims(),
            &EncodingKey::from_secret(b"secret"),
        )
        .expect("sign");
        assert_eq!(
            denied(&with_password(&jwt, &hs, now())),
            Some(Denial::BadCredentials)
        );
        assert_eq!(jwt.refresh_failures(), 0);
    }

    #[tokio::test]
    async fn an_outage_keeps_the_last_good_keys_for_max_stale() {
        let server = JwksServer::start(jwks(&[("rsa1", "r1")])).await;
        let jwt = Jwt::new(&jwks_config(&server.url)).expect("backend");
        let token = sign_with(
            Algorithm::RS256,
            "rsa1.key",
            Some("r1"),
            &json!({"sub": "alice", "exp": NOW + 86_400}),
        );
        let minutes = |m: u64| now() + Duration::from_secs(60 * m);
        assert!(jwt.refresh(now()).await.is_ok());
        assert_eq!(jwt.report(Health::Start, Ok(1), now()), Health::Fresh);

        server.set(503, "down".into());
        let err = jwt.refresh(minutes(10)).await.expect_err("503");
        assert!(err.to_string().contains("503"), "{err}");
        server.set(200, "{\"keys\": []}".into());
        let err = jwt.refresh(minutes(15)).await.expect_err("empty");
        assert!(err.to_string().contains("none of its 0 keys"), "{err}");
        server.set(200, "<html>".into());
        assert!(jwt.refresh(minutes(20)).await.is_err());
        assert_eq!(jwt.refresh_failures(), 3);

        // Within jwks_max_stale (1 h) of the last good fetch: still accepted.
        assert!(matches!(
            with_password(&jwt, &token, minutes(60)),
            Decision::Allow(_)
        ));
        let e = || Err(JwtError::Url("down".into()));
        assert_eq!(jwt.report(Health::Fresh, e(), minutes(30)), Health::Stale);
        assert_eq!(jwt.report(Health::Stale, e(), minutes(59)), Health::Stale);
        // After it: refused as the server's failure (0x88), not the token's (0x86).
        assert_eq!(
            denied(&with_password(&jwt, &token, minutes(61))),
            Some(Denial::Unavailable)
        );
        assert_eq!(jwt.report(Health::Stale, e(), minutes(61)), Health::Expired);

        // Back: accepted again, from the new fetch's time.
        server.set(200, jwks(&[("rsa1", "r1")]));
        assert!(jwt.refresh(minutes(61)).await.is_ok());
        assert!(matches!(
            with_password(&jwt, &token, minutes(61)),
            Decision::Allow(_)
        ));
        assert_eq!(
            jwt.report(Health::Expired, Ok(1), minutes(61)),
            Health::Fresh
        );

        // A server that is gone, and one that never answers (bounded by jwks_timeout).
        drop(server);
        let gone = Jwt::new(&jwks_config("http://127.0.0.1:1/jwks")).expect("backend");
        assert!(gone.refresh(now()).await.is_err());
        // Never fetched: no key to judge the token by, so no verdict on it either.
        assert_eq!(
            denied(&with_password(&gone, &token, now())),
            Some(Denial::Unavailable)
        );
        assert_eq!(
            gone.report(Health::Start, Err(JwtError::Url("x".into())), now()),
            Health::Missing
        );
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = silent.local_addr().expect("addr").port();
        let slow = Jwt::new(&JwtConfig {
            jwks_timeout: Duration::from_millis(200),
            ..jwks_config(&format!("http://127.0.0.1:{port}/jwks"))
        })
        .expect("backend");
        let err = slow.refresh(now()).await.expect_err("timeout");
        assert!(err.to_string().contains("no answer within 200ms"), "{err}");
    }

    /// Polls `done` every 20 ms for up to 10 s (a real clock: the fetch is real I/O).
    async fn eventually(mut done: impl FnMut() -> bool) -> bool {
        for _ in 0..500 {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        done()
    }

    #[tokio::test]
    async fn an_unknown_kid_refreshes_early_and_rate_limited() {
        let server = JwksServer::start(jwks(&[("rsa1", "r1")])).await;
        let mut jwt = Jwt::new(&jwks_config(&server.url)).expect("backend");
        if let Some(j) = jwt.jwks.as_mut() {
            j.early_min = Duration::from_millis(50);
        }
        let jwt = Arc::new(jwt);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(Arc::clone(&jwt).run_refresh(stopped));
        assert!(eventually(|| server.hits() == 1).await, "first fetch");

        // The provider rotates: r2 appears. The first token naming it is refused and wakes
        // the task; once it has fetched, r2 tokens are accepted.
        server.set(200, jwks(&[("rsa1", "r1"), ("rsa2", "r2")]));
        let real_now = SystemTime::now();
        let exp = seconds_since_epoch(real_now) as u64 + 3600;
        let token = sign_with(
            Algorithm::RS256,
            "rsa2.key",
            Some("r2"),
            &json!({"sub": "a", "exp": exp}),
        );
        let mut decision = with_password(&jwt, &token, real_now);
        assert!(matches!(decision, Decision::Deny(_)), "{decision:?}");
        assert!(
            eventually(|| {
                decision = with_password(&jwt, &token, SystemTime::now());
                matches!(decision, Decision::Allow(_))
            })
            .await,
            "{decision:?}"
        );
        assert_eq!(server.hits(), 2);
        // An HS256 token's kid is no JWKS business: it wakes nothing.
        let hs = encode(
            &Header {
                kid: Some("hs-1".into()),
                ..Header::new(Algorithm::HS256)
            },
            &json!({"sub": "a", "exp": exp}),
            &EncodingKey::from_secret(SECRET),
        )
        .expect("sign");
        assert!(matches!(
            with_password(&jwt, &hs, SystemTime::now()),
            Decision::Deny(_)
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(server.hits(), 2);

        let _ = stop.send(true);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task stops")
            .expect("no panic");

        // With the default 30 s limit, unknown kids do not fetch again right away.
        let jwt = Arc::new(Jwt::new(&jwks_config(&server.url)).expect("backend"));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(Arc::clone(&jwt).run_refresh(stopped));
        assert!(eventually(|| server.hits() == 3).await, "first fetch");
        let unknown = sign_with(
            Algorithm::RS256,
            "rsa2.key",
            Some("r3"),
            &json!({"sub": "a", "exp": exp}),
        );
        for _ in 0..5 {
            assert!(matches!(
                with_password(&jwt, &unknown, SystemTime::now()),
                Decision::Deny(_)
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(server.hits(), 3);
        drop(stop);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task stops when the sender is dropped")
            .expect("no panic");
    }

    #[tokio::test]
    async fn jwks_over_https_with_a_ca_file() {
        let certs: Vec<rustls_pki_types::CertificateDer<'static>> =
            rustls_pki_types::pem::PemObject::pem_file_iter(fixture("server.pem"))
                .expect("cert")
                .collect::<Result<_, _>>()
                .expect("cert");
        let key = <rustls_pki_types::PrivateKeyDer<'static> as rustls_pki_types::pem::PemObject>::from_pem_file(fixture("server.key"))
            .expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let server = JwksServer::start_with(jwks(&[("ec1", "e1")]), Some(acceptor)).await;
        assert!(server.url.starts_with("https://127.0.0.1:"));
        let jwt = Jwt::new(&JwtConfig {
            jwks_ca_file: Some(fixture("ca.pem")),
            ..jwks_config(&server.url)
        })
        .expect("backend");
        assert_eq!(jwt.refresh(now()).await.expect("fetched over TLS"), 1);
        let token = sign_with(Algorithm::ES256, "ec1.key", Some("e1"), &claims());
        assert!(matches!(
            with_password(&jwt, &token, now()),
            Decision::Allow(_)
        ));

        // The same server checked against a CA that did not sign it: refused.
        let wrong = Jwt::new(&JwtConfig {
            jwks_ca_file: Some(fixture("server.pem")),
            ..jwks_config(&server.url)
        })
        .expect("backend");
        let err = wrong.refresh(now()).await.expect_err("untrusted");
        assert!(
            err.to_string().contains("invalid peer certificate"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_reload_carries_the_fetched_keys_over() {
        let server = JwksServer::start(jwks(&[("rsa1", "r1")])).await;
        let old = Jwt::new(&jwks_config(&server.url)).expect("backend");
        assert!(old.refresh(now()).await.is_ok());
        let new = Jwt::new(&JwtConfig {
            leeway: Duration::ZERO,
            ..jwks_config(&server.url)
        })
        .expect("backend");
        new.carry_over(&old);
        let token = sign_with(Algorithm::RS256, "rsa1.key", Some("r1"), &claims());
        assert!(matches!(
            with_password(&new, &token, now()),
            Decision::Allow(_)
        ));
        let elsewhere = Jwt::new(&jwks_config("http://127.0.0.1:1/other")).expect("backend");
        elsewhere.carry_over(&old);
        assert!(matches!(
            with_password(&elsewhere, &token, now()),
            Decision::Deny(_)
        ));
    }
}
