//! The HTTP authentication backend: asks a service over HTTP (`[auth.http]`).
//!
//! CONNECT's credentials are POSTed as JSON to `connect_url`; with `acl_url`, so is every
//! SUBSCRIBE filter and PUBLISH topic. A 2xx answer allows; anything else denies, and so does
//! no answer within `timeout` (fail closed): the backend always decides, so it belongs last in
//! a listener's chain. The contract (bodies, statuses) is in docs/configuration.md,
//! `[auth.http]`.
//!
//! Why it is built this way:
//!
//! - **No stall for anyone else.** A check is an `async fn` awaited by its own connection's
//!   task; nothing is locked across the wait, so a slow or dead service holds up only the
//!   clients waiting for their own answers. Requests in flight are bounded by a semaphore
//!   (`max_concurrent`), and the wait for a permit counts against the same `timeout`, so a
//!   check never takes longer than `timeout`, whatever the service does.
//! - **One pooled client.** hyper-util's client keeps connections to the service alive and
//!   reuses them, so a check costs one request, not a TCP and TLS handshake (`tern ctl` opens a
//!   connection per request because it makes one or two). The answer's body is read (bounded)
//!   so the connection can go back to the pool; only the status decides.
//! - **Cache.** Answers that are decisions (2xx, and 4xx but 408 and 429) are kept for
//!   `cache_ttl`, allows and denies alike; timeouts, connection errors and other statuses are
//!   not decisions and are never kept, so an outage does not outlive itself. An entry's key is
//!   a SHA-256 over a random per-process salt and the whole request, password included, so
//!   no password is kept and a memory dump gives no dictionary attack either. The key leaves
//!   out the client's source port (the body carries it): a reconnect comes from a new port,
//!   and keying on it would make the cache useless for CONNECT; a service must not base its
//!   decision on the port. The cache is bounded in entries (quick_cache) and reads its time
//!   from tokio's clock, so tests can move it.
//! - **Passwords are bytes.** MQTT's password is binary data. A UTF-8 password travels as
//!   the string `password`; any other travels as `password_base64` (standard alphabet, with
//!   padding) and `password` is null, so nothing is lost and a service that ignores the field
//!   fails closed.
//! - **Counted.** Every check is counted once by kind and outcome
//!   (`tern_auth_http_checks_total`), and every request that reached for the service is
//!   timed (`tern_auth_http_request_duration_seconds`). A service that stops answering is
//!   logged once at `warn`, and once more at `info` when it answers again, not per check.

use super::chain::{Credentials, Decision, Denial, Grant};
use crate::config::{ConfigError, HttpAuthConfig};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode, Uri};
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Largest answer body read (and thrown away) so the connection can be reused.
const MAX_ANSWER: usize = 64 * 1024;
/// How long an idle connection to the service is kept for reuse.
const POOL_IDLE: Duration = Duration::from_secs(30);

/// Why the backend cannot be built (the broker refuses to start).
#[derive(Debug, thiserror::Error)]
pub enum HttpAuthError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("auth.http.ca_file: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error(
        "auth.http: no CA certificates found in the system's store for https:// ({0}); set auth.http.ca_file"
    )]
    Roots(std::io::Error),
}

/// What an authorisation check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A PUBLISH (or a will) to a topic.
    Publish,
    /// A SUBSCRIBE to a filter.
    Subscribe,
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
        }
    }
}

/// Which URL a check goes to: the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connect,
    Acl,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Connect, Kind::Acl];

    fn label(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::Acl => "acl",
        }
    }
}

/// How one check ended: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// 2xx.
    Allow,
    /// 4xx but 408 and 429: the service refused.
    Deny,
    /// No answer's head within the timeout.
    Timeout,
    /// The service could not be reached, or answered 1xx, 3xx, 5xx, 408 or 429.
    Error,
    /// No request slot came free within the timeout (`max_concurrent` in flight).
    Busy,
    CachedAllow,
    CachedDeny,
}

impl Outcome {
    const ALL: [Outcome; 7] = [
        Outcome::Allow,
        Outcome::Deny,
        Outcome::Timeout,
        Outcome::Error,
        Outcome::Busy,
        Outcome::CachedAllow,
        Outcome::CachedDeny,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
            Outcome::Busy => "busy",
            Outcome::CachedAllow => "cached_allow",
            Outcome::CachedDeny => "cached_deny",
        }
    }

    fn allows(self) -> bool {
        matches!(self, Outcome::Allow | Outcome::CachedAllow)
    }

    /// The service's decision (kept in the cache), as opposed to a failure to get one.
    fn is_decision(self) -> bool {
        matches!(self, Outcome::Allow | Outcome::Deny)
    }

    fn of_status(status: StatusCode) -> Outcome {
        if status.is_success() {
            Outcome::Allow
        } else if status.is_client_error()
            && status != StatusCode::REQUEST_TIMEOUT
            && status != StatusCode::TOO_MANY_REQUESTS
        {
            Outcome::Deny
        } else {
            Outcome::Error
        }
    }
}

/// The backend's counters, resolved once (declared in `metrics.rs`, which sits above this
/// module and hands them in). The default counts nowhere (`tern check`, tests).
#[derive(Clone, Default)]
pub struct HttpAuthMetrics {
    /// Indexed by `kind as usize * Outcome::ALL.len() + outcome as usize`.
    requests: Vec<IntCounter>,
    /// Indexed by kind.
    latency: Vec<Histogram>,
}

impl HttpAuthMetrics {
    /// Every series of `requests` (labels `kind`, `outcome`) and of `latency` (label `kind`),
    /// so each exists from the start, at 0.
    pub fn new(
        requests: &IntCounterVec,
        latency: &HistogramVec,
    ) -> prometheus::Result<HttpAuthMetrics> {
        let mut counters = Vec::with_capacity(Kind::ALL.len() * Outcome::ALL.len());
        let mut histograms = Vec::with_capacity(Kind::ALL.len());
        for kind in Kind::ALL {
            for outcome in Outcome::ALL {
                counters
                    .push(requests.get_metric_with_label_values(&[kind.label(), outcome.label()])?);
            }
            histograms.push(latency.get_metric_with_label_values(&[kind.label()])?);
        }
        Ok(HttpAuthMetrics {
            requests: counters,
            latency: histograms,
        })
    }

    fn count(&self, kind: Kind, outcome: Outcome) {
        if let Some(c) = self
            .requests
            .get(kind as usize * Outcome::ALL.len() + outcome as usize)
        {
            c.inc();
        }
    }

    fn observe(&self, kind: Kind, took: Duration) {
        if let Some(h) = self.latency.get(kind as usize) {
            h.observe(took.as_secs_f64());
        }
    }
}

/// The body POSTed to `connect_url`.
#[derive(Serialize)]
struct ConnectBody<'a> {
    client_id: &'a str,
    username: Option<&'a str>,
    /// The password when it is UTF-8; else null, and `password_base64` holds it.
    password: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password_base64: Option<String>,
    listener: &'a str,
    /// `ip:port` (`[v6]:port`).
    address: String,
    /// 3, 4 or 5.
    protocol: u8,
}

/// The body POSTed to `acl_url`.
#[derive(Serialize)]
struct AclBody<'a> {
    client_id: &'a str,
    username: Option<&'a str>,
    listener: &'a str,
    address: String,
    action: &'static str,
    topic: &'a str,
}

/// A cached answer.
#[derive(Clone, Copy)]
struct Cached {
    allow: bool,
    until: Instant,
}

struct AnswerCache {
    entries: quick_cache::sync::Cache<[u8; 32], Cached>,
    ttl: Duration,
}

/// The HTTP backend: one per configuration, shared by every connection.
pub struct HttpAuth {
    client: super::client::Client,
    connect_url: Uri,
    acl_url: Option<Uri>,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
    /// Request slots (`max_concurrent`).
    permits: Semaphore,
    cache: Option<AnswerCache>,
    /// Mixed into every cache key, so keys say nothing outside this process.
    salt: [u8; 32],
    metrics: HttpAuthMetrics,
    /// Whether the last request got an answer (for logging the changes only).
    answering: AtomicBool,
}

/// Adds one field to a cache key: its length, then its bytes (`None` has a length no field
/// has), so no two requests share a key by shifting bytes between fields.
fn key_field(h: &mut Sha256, field: Option<&[u8]>) {
    match field {
        Some(b) => {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        }
        None => h.update(u64::MAX.to_be_bytes()),
    }
}

impl HttpAuth {
    /// Builds the backend from its (validated here) settings; `metrics` come from
    /// `Metrics::auth_http`. Reads `ca_file`, or the system's roots for an `https://` URL.
    pub fn new(cfg: &HttpAuthConfig, metrics: HttpAuthMetrics) -> Result<HttpAuth, HttpAuthError> {
        cfg.validate()?;
        let parse = |key: &'static str, url: &str| {
            url.parse::<Uri>().map_err(|e| ConfigError::Invalid {
                key,
                message: e.to_string(),
            })
        };
        let connect_url = parse("auth.http.connect_url", &cfg.connect_url)?;
        let acl_url = match &cfg.acl_url {
            Some(u) => Some(parse("auth.http.acl_url", u)?),
            None => None,
        };
        let mut headers = Vec::with_capacity(cfg.headers.len());
        for (name, value) in &cfg.headers {
            let invalid = |message: String| ConfigError::Invalid {
                key: "auth.http.headers",
                message,
            };
            headers.push((
                HeaderName::from_bytes(name.as_bytes()).map_err(|e| invalid(e.to_string()))?,
                HeaderValue::from_str(value).map_err(|e| invalid(e.to_string()))?,
            ));
        }

        let https = std::iter::once(&connect_url)
            .chain(acl_url.as_ref())
            .any(|u| u.scheme_str() == Some("https"));
        let client = super::client::build(&super::client::Settings {
            ca_file: cfg.ca_file.as_deref(),
            https,
            connect_timeout: cfg.timeout,
            pool_idle: POOL_IDLE,
            pool_max_idle: cfg.max_concurrent,
        })
        .map_err(|e| match e {
            super::client::ClientError::CaFile(e) => HttpAuthError::Tls(e),
            super::client::ClientError::NoRoots(e) => HttpAuthError::Roots(e),
        })?;

        let cache = (!cfg.cache_ttl.is_zero() && cfg.cache_max_entries > 0).then(|| AnswerCache {
            entries: quick_cache::sync::Cache::new(cfg.cache_max_entries),
            ttl: cfg.cache_ttl,
        });
        let mut salt = [0u8; 32];
        // Without OS randomness the keys are still hashes: only the dump resistance is lost.
        if let Err(e) = getrandom::fill(&mut salt) {
            tracing::warn!(error = %e, "auth.http: no OS randomness for the cache keys' salt");
        }
        Ok(HttpAuth {
            client,
            connect_url,
            acl_url,
            headers,
            timeout: cfg.timeout,
            permits: Semaphore::new(cfg.max_concurrent),
            cache,
            salt,
            metrics,
            answering: AtomicBool::new(true),
        })
    }

    /// Whether `acl_url` is set: whether [`HttpAuth::authorize`] asks the service at all.
    pub fn has_acl(&self) -> bool {
        self.acl_url.is_some()
    }

    /// CONNECT's credentials: `Allow` on a 2xx answer, `Deny(BadCredentials)` on a refusal
    /// (4xx but 408 and 429), `Deny(Unavailable)` on no decision: any other answer, none
    /// within the timeout, or a service that cannot be reached. Never `Pass`.
    pub async fn check(&self, c: &Credentials<'_>) -> Decision {
        let key = self.cache.as_ref().map(|_| {
            self.key(&[
                Some(b"connect".as_slice()),
                Some(c.client_id.as_bytes()),
                c.username.map(str::as_bytes),
                c.password,
                Some(c.listener.as_bytes()),
                Some(&ip_octets(c.peer)),
                Some(std::slice::from_ref(&c.protocol)),
            ])
        });
        let body = || {
            let (password, password_base64) = match c.password.map(std::str::from_utf8) {
                None => (None, None),
                Some(Ok(text)) => (Some(text), None),
                Some(Err(_)) => (
                    None,
                    c.password
                        .map(|p| base64::engine::general_purpose::STANDARD.encode(p)),
                ),
            };
            serde_json::to_vec(&ConnectBody {
                client_id: c.client_id,
                username: c.username,
                password,
                password_base64,
                listener: c.listener,
                address: c.peer.to_string(),
                protocol: c.protocol,
            })
        };
        match self.ask(Kind::Connect, &self.connect_url, key, body).await {
            o if o.allows() => Decision::Allow(Grant::default()),
            Outcome::Deny | Outcome::CachedDeny => Decision::Deny(Denial::BadCredentials),
            _ => Decision::Deny(Denial::Unavailable),
        }
    }

    /// Whether the service allows `action` on `topic` (a PUBLISH topic or a SUBSCRIBE
    /// filter): a 2xx answer from `acl_url`. Without `acl_url`, `true` (this backend does not
    /// restrict topics). Fails closed as [`HttpAuth::check`] does.
    pub async fn authorize(
        &self,
        client_id: &str,
        username: Option<&str>,
        listener: &str,
        address: SocketAddr,
        action: Action,
        topic: &str,
    ) -> bool {
        let Some(url) = &self.acl_url else {
            return true;
        };
        let key = self.cache.as_ref().map(|_| {
            self.key(&[
                Some(b"acl".as_slice()),
                Some(client_id.as_bytes()),
                username.map(str::as_bytes),
                Some(listener.as_bytes()),
                Some(&ip_octets(address)),
                Some(action.label().as_bytes()),
                Some(topic.as_bytes()),
            ])
        });
        let body = || {
            serde_json::to_vec(&AclBody {
                client_id,
                username,
                listener,
                address: address.to_string(),
                action: action.label(),
                topic,
            })
        };
        self.ask(Kind::Acl, url, key, body).await.allows()
    }

    fn key(&self, fields: &[Option<&[u8]>]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        for f in fields {
            key_field(&mut h, *f);
        }
        h.finalize().into()
    }

    /// One check: the cache, else the service; counted once. The body is encoded only when
    /// the service is asked, so a cache hit (most PUBLISHes of a listener with `acl_url`)
    /// allocates nothing.
    async fn ask(
        &self,
        kind: Kind,
        url: &Uri,
        key: Option<[u8; 32]>,
        body: impl FnOnce() -> serde_json::Result<Vec<u8>>,
    ) -> Outcome {
        if let (Some(cache), Some(key)) = (&self.cache, &key) {
            if let Some(hit) = cache.entries.get(key) {
                if Instant::now() < hit.until {
                    let outcome = if hit.allow {
                        Outcome::CachedAllow
                    } else {
                        Outcome::CachedDeny
                    };
                    self.metrics.count(kind, outcome);
                    return outcome;
                }
                cache.entries.remove(key);
            }
        }
        let outcome = match body() {
            Ok(json) => self.send(kind, url, json).await,
            Err(e) => {
                tracing::warn!(error = %e, "auth.http: request body not encoded");
                Outcome::Error
            }
        };
        self.metrics.count(kind, outcome);
        if outcome.is_decision() {
            if let (Some(cache), Some(key)) = (&self.cache, key) {
                cache.entries.insert(
                    key,
                    Cached {
                        allow: outcome.allows(),
                        until: Instant::now() + cache.ttl,
                    },
                );
            }
        }
        outcome
    }

    /// POSTs `json` to `url` within the timeout (the wait for a request slot included).
    async fn send(&self, kind: Kind, url: &Uri, json: Vec<u8>) -> Outcome {
        let deadline = Instant::now() + self.timeout;
        let permit = match tokio::time::timeout_at(deadline, self.permits.acquire()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return self.failed(kind, Outcome::Error, "closed"),
            Err(_) => {
                return self.failed(
                    kind,
                    Outcome::Busy,
                    "every request slot (max_concurrent) stayed taken for the whole timeout",
                )
            }
        };
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(url.clone())
            .header(CONTENT_TYPE, "application/json");
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let request = match request.body(Full::new(Bytes::from(json))) {
            Ok(r) => r,
            Err(e) => return self.failed(kind, Outcome::Error, &e.to_string()),
        };
        let started = Instant::now();
        let answer = tokio::time::timeout_at(deadline, self.client.request(request)).await;
        self.metrics.observe(kind, started.elapsed());
        let status = match answer {
            Ok(Ok(answer)) => {
                let status = answer.status();
                // The status decides; the body is read only so the connection can be reused,
                // and a body that does not come in time just costs that connection.
                let _ = tokio::time::timeout_at(
                    deadline,
                    Limited::new(answer.into_body(), MAX_ANSWER).collect(),
                )
                .await;
                status
            }
            Ok(Err(e)) => {
                return self.failed(kind, Outcome::Error, &super::client::error_chain(&e))
            }
            Err(_) => return self.failed(kind, Outcome::Timeout, "no answer within the timeout"),
        };
        drop(permit);
        let outcome = Outcome::of_status(status);
        if outcome == Outcome::Error {
            return self.failed(kind, outcome, &format!("answered {status}"));
        }
        if !self.answering.swap(true, Ordering::Relaxed) {
            tracing::info!(kind = kind.label(), "auth.http: the service answers again");
        }
        outcome
    }

    /// Logs a failed request: at `warn` for the first after an answer, at `debug` after that.
    fn failed(&self, kind: Kind, outcome: Outcome, why: &str) -> Outcome {
        if self.answering.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                kind = kind.label(),
                outcome = outcome.label(),
                error = why,
                "auth.http: no decision from the service, refusing (fail closed) until it answers"
            );
        } else {
            tracing::debug!(
                kind = kind.label(),
                outcome = outcome.label(),
                error = why,
                "auth.http: no decision"
            );
        }
        outcome
    }
}

/// The client's address in a cache key: its IP's family (4 or 6) and octets, without the
/// port (a reconnect comes from a new one) and without a string made for it.
fn ip_octets(address: SocketAddr) -> [u8; 17] {
    let (family, octets) = match address.ip() {
        IpAddr::V4(ip) => (4, ip.to_ipv6_mapped().octets()),
        IpAddr::V6(ip) => (6, ip.octets()),
    };
    let mut key = [family; 17];
    key[1..].copy_from_slice(&octets);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::Response;
    use hyper_util::rt::TokioIo;
    use prometheus::{HistogramOpts, Opts};
    use serde_json::{json, Value};
    use std::future::Future;
    use std::sync::Arc;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    /// Longest any wait of these tests may take before it fails.
    const WAIT: Duration = Duration::from_secs(10);

    /// `f`, which must end within [`WAIT`].
    async fn within<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(WAIT, f).await.expect("ends in time")
    }

    /// What the service saw of one request.
    #[derive(Debug)]
    struct Seen {
        path: String,
        body: Value,
        authorization: Option<String>,
        content_type: Option<String>,
    }

    /// A service on 127.0.0.1: answers each request with `answer(body)`, after telling
    /// `seen` what it got.
    struct Service {
        addr: SocketAddr,
        seen: mpsc::UnboundedReceiver<Seen>,
    }

    impl Service {
        async fn next(&mut self) -> Seen {
            tokio::time::timeout(WAIT, self.seen.recv())
                .await
                .expect("a request in time")
                .expect("the service runs")
        }

        /// Requests seen so far and not yet taken.
        fn pending(&mut self) -> usize {
            let mut n = 0;
            while self.seen.try_recv().is_ok() {
                n += 1;
            }
            n
        }
    }

    async fn service<F, Fut>(tls: Option<tokio_rustls::TlsAcceptor>, answer: F) -> Service
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = StatusCode> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (tx, seen) = mpsc::unbounded_channel();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (tx, answer, tls) = (tx.clone(), Arc::clone(&answer), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (tx, answer) = (tx.clone(), Arc::clone(&answer));
                        async move {
                            let header = |name| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v: &HeaderValue| v.to_str().ok())
                                    .map(str::to_string)
                            };
                            let (authorization, content_type) =
                                (header("authorization"), header("content-type"));
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await?.to_bytes();
                            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let _ = tx.send(Seen {
                                path,
                                body: body.clone(),
                                authorization,
                                content_type,
                            });
                            let status = answer(body).await;
                            Ok::<_, hyper::Error>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(b"{\"ok\":1}")))
                                    .expect("response"),
                            )
                        }
                    });
                    match tls {
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), svc)
                                    .await;
                            }
                        }
                        None => {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        }
                    }
                });
            }
        });
        Service { addr, seen }
    }

    /// A service answering 200 to everything.
    async fn allowing() -> Service {
        service(None, |_| async { StatusCode::OK }).await
    }

    fn settings(addr: SocketAddr) -> HttpAuthConfig {
        HttpAuthConfig {
            connect_url: format!("http://{addr}/connect"),
            acl_url: Some(format!("http://{addr}/acl")),
            ..HttpAuthConfig::default()
        }
    }

    /// The backend and its request counters.
    fn backend(cfg: &HttpAuthConfig) -> (Arc<HttpAuth>, IntCounterVec) {
        let requests =
            IntCounterVec::new(Opts::new("requests", "r"), &["kind", "outcome"]).expect("counter");
        let latency =
            HistogramVec::new(HistogramOpts::new("latency", "l"), &["kind"]).expect("histogram");
        let metrics = HttpAuthMetrics::new(&requests, &latency).expect("metrics");
        let auth = HttpAuth::new(cfg, metrics).expect("backend");
        (Arc::new(auth), requests)
    }

    fn count(v: &IntCounterVec, kind: &str, outcome: &str) -> u64 {
        v.with_label_values(&[kind, outcome]).get()
    }

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn creds<'a>(client_id: &'a str, password: Option<&'a [u8]>) -> Credentials<'a> {
        Credentials {
            client_id,
            username: Some("alice"),
            password,
            listener: "tcp",
            peer: peer(40_000),
            protocol: 5,
        }
    }

    fn allowed(d: &Decision) -> bool {
        denial(d).is_none()
    }

    /// Why a check refused (None: allowed).
    fn denial(d: &Decision) -> Option<Denial> {
        match d {
            Decision::Allow(_) => None,
            Decision::Deny(why) => Some(*why),
            Decision::Pass => panic!("the HTTP backend always decides"),
        }
    }

    /// A check on an owned copy, for tasks of their own.
    fn spawn_check(auth: &Arc<HttpAuth>, client_id: &str) -> tokio::task::JoinHandle<bool> {
        let (auth, client_id) = (Arc::clone(auth), client_id.to_string());
        tokio::spawn(async move { allowed(&auth.check(&creds(&client_id, Some(b"pw"))).await) })
    }

    #[test]
    fn checks_can_run_in_any_task() {
        fn send<T: Send>(_: T) {}
        let (auth, _) = backend(&settings(peer(1)));
        send(auth.check(&creds("c", None)));
        send(auth.authorize("c", None, "tcp", peer(1), Action::Publish, "t"));
    }

    #[tokio::test]
    async fn the_status_decides_and_every_outcome_is_counted() {
        let svc = service(None, |body| async move {
            match body["password"].as_str() {
                Some("right") => StatusCode::NO_CONTENT,
                Some("wrong") => StatusCode::FORBIDDEN,
                Some("later") => StatusCode::TOO_MANY_REQUESTS,
                Some("moved") => StatusCode::FOUND,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            }
        })
        .await;
        let (auth, counts) = backend(&HttpAuthConfig {
            cache_ttl: Duration::ZERO,
            ..settings(svc.addr)
        });
        let why = |d: Decision| denial(&d);
        assert_eq!(why(auth.check(&creds("c", Some(b"right"))).await), None);
        // A refusal is the service's decision on the credentials: 0x86.
        assert_eq!(
            why(auth.check(&creds("c", Some(b"wrong"))).await),
            Some(Denial::BadCredentials)
        );
        // Anything else is no decision: 0x88, try again later.
        for password in [&b"later"[..], b"moved", b"crash"] {
            assert_eq!(
                why(auth.check(&creds("c", Some(password))).await),
                Some(Denial::Unavailable)
            );
        }
        assert_eq!(count(&counts, "connect", "allow"), 1);
        assert_eq!(count(&counts, "connect", "deny"), 1);
        assert_eq!(count(&counts, "connect", "error"), 3);
        assert_eq!(count(&counts, "connect", "timeout"), 0);
    }

    #[tokio::test]
    async fn bodies_carry_every_field() {
        let mut svc = allowing().await;
        let (auth, counts) = backend(&HttpAuthConfig {
            headers: [("Authorization".to_string(), "Bearer tern".to_string())].into(),
            ..settings(svc.addr)
        });
        let binary = Credentials {
            username: None,
            protocol: 4,
            ..creds("dev-1", Some(&[0xff, 0x00, b'a']))
        };
        assert!(allowed(&auth.check(&binary).await));
        let seen = svc.next().await;
        assert_eq!(seen.path, "/connect");
        assert_eq!(seen.authorization.as_deref(), Some("Bearer tern"));
        assert_eq!(seen.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            seen.body,
            json!({"client_id": "dev-1", "username": null, "password": null,
                   "password_base64": "/wBh", "listener": "tcp",
                   "address": "127.0.0.1:40000", "protocol": 4})
        );

        let none = Credentials {
            password: None,
            ..creds("dev-2", None)
        };
        assert!(allowed(&auth.check(&none).await));
        assert_eq!(
            svc.next().await.body,
            json!({"client_id": "dev-2", "username": "alice", "password": null,
                   "listener": "tcp", "address": "127.0.0.1:40000", "protocol": 5})
        );
        assert!(allowed(
            &auth
                .check(&creds("dev-3", Some("pässword".as_bytes())))
                .await
        ));
        assert_eq!(svc.next().await.body["password"], "pässword");

        let v6: SocketAddr = "[::1]:1883".parse().expect("address");
        assert!(
            auth.authorize("dev-1", Some("alice"), "ws", v6, Action::Publish, "a/b")
                .await
        );
        let seen = svc.next().await;
        assert_eq!(seen.path, "/acl");
        assert_eq!(seen.authorization.as_deref(), Some("Bearer tern"));
        assert_eq!(
            seen.body,
            json!({"client_id": "dev-1", "username": "alice", "listener": "ws",
                   "address": "[::1]:1883", "action": "publish", "topic": "a/b"})
        );
        assert!(
            auth.authorize("dev-1", None, "ws", v6, Action::Subscribe, "a/+/#")
                .await
        );
        let seen = svc.next().await;
        assert_eq!(
            (
                &seen.body["action"],
                &seen.body["topic"],
                &seen.body["username"]
            ),
            (&json!("subscribe"), &json!("a/+/#"), &Value::Null)
        );
        assert_eq!(count(&counts, "connect", "allow"), 3);
        assert_eq!(count(&counts, "acl", "allow"), 2);
    }

    #[tokio::test]
    async fn topics_are_not_restricted_without_an_acl_url() {
        let mut svc = allowing().await;
        let (auth, _) = backend(&HttpAuthConfig {
            acl_url: None,
            ..settings(svc.addr)
        });
        assert!(!auth.has_acl());
        assert!(
            auth.authorize("c", None, "tcp", peer(1), Action::Publish, "t")
                .await
        );
        assert_eq!(svc.pending(), 0);
    }

    #[tokio::test]
    async fn a_silent_service_denies_within_the_timeout() {
        let mut svc = service(None, |_| std::future::pending()).await;
        let (auth, counts) = backend(&HttpAuthConfig {
            timeout: Duration::from_millis(200),
            ..settings(svc.addr)
        });
        assert_eq!(
            denial(&within(auth.check(&creds("c", Some(b"pw")))).await),
            Some(Denial::Unavailable)
        );
        svc.next().await;
        let acl = auth.authorize("c", None, "tcp", peer(1), Action::Subscribe, "t");
        assert!(!tokio::time::timeout(WAIT, acl).await.expect("ends"));
        assert_eq!(count(&counts, "connect", "timeout"), 1);
        assert_eq!(count(&counts, "acl", "timeout"), 1);
        // A timeout is no decision: not cached, the next check asks again.
        assert!(!allowed(
            &within(auth.check(&creds("c", Some(b"pw")))).await
        ));
        assert_eq!(count(&counts, "connect", "timeout"), 2);
    }

    #[tokio::test]
    async fn an_unreachable_service_denies() {
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = closed.local_addr().expect("address");
        drop(closed);
        let (auth, counts) = backend(&settings(addr));
        assert_eq!(
            denial(&auth.check(&creds("c", Some(b"pw"))).await),
            Some(Denial::Unavailable)
        );
        assert!(
            !auth
                .authorize("c", None, "tcp", peer(1), Action::Publish, "t")
                .await
        );
        assert_eq!(count(&counts, "connect", "error"), 1);
        assert_eq!(count(&counts, "acl", "error"), 1);
    }

    #[tokio::test]
    async fn cached_answers_spare_the_service() {
        let mut svc = service(None, |body| async move {
            match body["password"].as_str() {
                Some("right") | None => StatusCode::OK,
                Some("crash") => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::UNAUTHORIZED,
            }
        })
        .await;
        let (auth, counts) = backend(&settings(svc.addr));
        assert!(allowed(&auth.check(&creds("c", Some(b"right"))).await));
        // The same request from another source port: a reconnect.
        let reconnect = Credentials {
            peer: peer(40_001),
            ..creds("c", Some(b"right"))
        };
        assert!(allowed(&auth.check(&reconnect).await));
        assert_eq!(svc.pending(), 1);
        // Denies are decisions too.
        assert!(!allowed(&auth.check(&creds("c", Some(b"wrong"))).await));
        assert_eq!(
            denial(&auth.check(&creds("c", Some(b"wrong"))).await),
            Some(Denial::BadCredentials),
            "a cached refusal is the service's refusal"
        );
        assert_eq!(svc.pending(), 1);
        // Any other field makes another request.
        assert!(!allowed(&auth.check(&creds("c", Some(b"wrong2"))).await));
        assert!(!allowed(&auth.check(&creds("d", Some(b"wrong"))).await));
        let other_ip = Credentials {
            peer: SocketAddr::from(([127, 0, 0, 2], 40_000)),
            ..creds("c", Some(b"right"))
        };
        assert!(allowed(&auth.check(&other_ip).await));
        assert_eq!(svc.pending(), 3);
        // Failures are not: each asks again.
        assert!(!allowed(&auth.check(&creds("c", Some(b"crash"))).await));
        assert!(!allowed(&auth.check(&creds("c", Some(b"crash"))).await));
        assert_eq!(svc.pending(), 2);
        for _ in 0..2 {
            assert!(
                auth.authorize("c", None, "tcp", peer(5), Action::Publish, "a")
                    .await
            );
        }
        assert!(
            auth.authorize("c", None, "tcp", peer(5), Action::Subscribe, "a")
                .await
        );
        assert_eq!(svc.pending(), 2);
        assert_eq!(count(&counts, "connect", "cached_allow"), 1);
        assert_eq!(count(&counts, "connect", "cached_deny"), 1);
        assert_eq!(count(&counts, "connect", "allow"), 2);
        assert_eq!(count(&counts, "connect", "deny"), 3);
        assert_eq!(count(&counts, "connect", "error"), 2);
        assert_eq!(count(&counts, "acl", "allow"), 2);
        assert_eq!(count(&counts, "acl", "cached_allow"), 1);
    }

    /// The cache's time is tokio's: paused and moved past the TTL between checks (never
    /// while a request is out, whose I/O would see the clock jump).
    #[tokio::test]
    async fn cached_answers_expire_after_the_ttl() {
        let mut svc = allowing().await;
        let (auth, counts) = backend(&HttpAuthConfig {
            cache_ttl: Duration::from_secs(30),
            ..settings(svc.addr)
        });
        let skip = |by: Duration| async move {
            tokio::time::pause();
            tokio::time::advance(by).await;
            tokio::time::resume();
        };
        assert!(allowed(&auth.check(&creds("c", Some(b"pw"))).await));
        skip(Duration::from_secs(29)).await;
        assert!(allowed(&auth.check(&creds("c", Some(b"pw"))).await));
        assert_eq!(svc.pending(), 1);
        skip(Duration::from_secs(2)).await;
        assert!(allowed(&auth.check(&creds("c", Some(b"pw"))).await));
        assert_eq!(svc.pending(), 1);
        assert_eq!(count(&counts, "connect", "allow"), 2);
        assert_eq!(count(&counts, "connect", "cached_allow"), 1);
    }

    #[tokio::test]
    async fn no_cache_with_a_zero_ttl() {
        let mut svc = allowing().await;
        let (auth, _) = backend(&HttpAuthConfig {
            cache_ttl: Duration::ZERO,
            ..settings(svc.addr)
        });
        for _ in 0..3 {
            assert!(allowed(&auth.check(&creds("c", Some(b"pw"))).await));
        }
        assert_eq!(svc.pending(), 3);
    }

    /// A service that holds every request until the test lets one go.
    async fn gated() -> (Service, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        let held = Arc::clone(&gate);
        let svc = service(None, move |_| {
            let gate = Arc::clone(&held);
            async move {
                if let Ok(p) = gate.acquire().await {
                    p.forget();
                }
                StatusCode::OK
            }
        })
        .await;
        (svc, gate)
    }

    #[tokio::test]
    async fn requests_in_flight_are_bounded() {
        let (mut svc, gate) = gated().await;
        let (auth, _) = backend(&HttpAuthConfig {
            max_concurrent: 2,
            timeout: Duration::from_secs(30),
            ..settings(svc.addr)
        });
        let checks: Vec<_> = ["c1", "c2", "c3"]
            .iter()
            .map(|c| spawn_check(&auth, c))
            .collect();
        let mut first = vec![svc.next().await.body, svc.next().await.body];
        // Both slots are held by requests the service has not answered: the third cannot
        // have been sent, whatever the scheduling.
        assert_eq!(auth.permits.available_permits(), 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(svc.pending(), 0, "a third request went out");
        gate.add_permits(1);
        let third = svc.next().await.body;
        first.push(third.clone());
        let mut ids: Vec<_> = first
            .iter()
            .filter_map(|b| b["client_id"].as_str().map(str::to_string))
            .collect();
        ids.sort();
        assert_eq!(ids, ["c1", "c2", "c3"]);
        gate.add_permits(2);
        for c in checks {
            assert!(tokio::time::timeout(WAIT, c)
                .await
                .expect("ends")
                .expect("runs"));
        }
        assert_eq!(auth.permits.available_permits(), 2);
    }

    #[tokio::test]
    async fn a_check_finding_no_free_slot_fails_closed_within_the_timeout() {
        let mut svc = allowing().await;
        let (auth, counts) = backend(&HttpAuthConfig {
            max_concurrent: 1,
            timeout: Duration::from_millis(200),
            ..settings(svc.addr)
        });
        // The one slot taken for longer than the check's timeout (as by a request to a
        // service slower than that, started later than this check).
        let taken = auth.permits.acquire().await.expect("a slot");
        assert_eq!(
            denial(&within(auth.check(&creds("c", Some(b"pw")))).await),
            Some(Denial::Unavailable)
        );
        assert_eq!(count(&counts, "connect", "busy"), 1);
        assert_eq!(svc.pending(), 0, "the waiting check sent nothing");
        drop(taken);
        assert!(allowed(&within(auth.check(&creds("c", Some(b"pw")))).await));
        assert_eq!(svc.pending(), 1);
    }

    /// The property the backend exists for: one client's check stuck on a slow answer does
    /// not hold up anyone else's. Shown by the order of events: the other checks finish while
    /// the slow one is still waiting, and it finishes only when its answer is let go.
    #[tokio::test]
    async fn a_slow_answer_holds_up_no_one_else() {
        let gate = Arc::new(Semaphore::new(0));
        let held = Arc::clone(&gate);
        let mut svc = service(None, move |body| {
            let gate = Arc::clone(&held);
            async move {
                if body["client_id"] == "slow" {
                    if let Ok(p) = gate.acquire().await {
                        p.forget();
                    }
                }
                StatusCode::OK
            }
        })
        .await;
        let (auth, _) = backend(&HttpAuthConfig {
            timeout: Duration::from_secs(30),
            cache_ttl: Duration::ZERO,
            ..settings(svc.addr)
        });
        let slow = spawn_check(&auth, "slow");
        assert_eq!(svc.next().await.body["client_id"], "slow");
        for id in ["fast-1", "fast-2", "fast-3"] {
            assert!(allowed(
                &within(auth.check(&creds(id, Some(b"other")))).await
            ));
            assert_eq!(svc.next().await.body["client_id"], id);
        }
        let acl = auth.authorize("fast-4", None, "tcp", peer(2), Action::Publish, "t");
        assert!(tokio::time::timeout(WAIT, acl).await.expect("ends"));
        assert!(
            !slow.is_finished(),
            "the slow check ended before its answer"
        );
        gate.add_permits(1);
        assert!(tokio::time::timeout(WAIT, slow)
            .await
            .expect("ends")
            .expect("runs"));
    }

    #[tokio::test]
    async fn https_checks_the_service_against_the_ca_file() {
        let dir = std::env::temp_dir().join(format!("tern-auth-http-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/certs/gen.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .arg(&dir)
            .output()
            .expect("run certs/gen.sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let server = {
            use rustls_pki_types::pem::PemObject;
            use rustls_pki_types::{CertificateDer, PrivateKeyDer};
            let chain: Vec<_> = CertificateDer::pem_file_iter(dir.join("server.pem"))
                .expect("server.pem")
                .collect::<Result<_, _>>()
                .expect("certificates");
            let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).expect("server.key");
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config")
        };
        let mut svc = service(
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))),
            |_| async { StatusCode::OK },
        )
        .await;
        let url = format!("https://localhost:{}/connect", svc.addr.port());
        let (auth, counts) = backend(&HttpAuthConfig {
            connect_url: url.clone(),
            acl_url: None,
            ca_file: Some(dir.join("ca.pem")),
            ..HttpAuthConfig::default()
        });
        assert!(allowed(&auth.check(&creds("c", Some(b"pw"))).await));
        assert_eq!(svc.next().await.path, "/connect");
        assert_eq!(count(&counts, "connect", "allow"), 1);

        // Against the system's roots the development CA is unknown: refused, never sent.
        let cfg = HttpAuthConfig {
            connect_url: url,
            acl_url: None,
            ..HttpAuthConfig::default()
        };
        let requests = IntCounterVec::new(Opts::new("r", "r"), &["kind", "outcome"]).expect("c");
        let latency = HistogramVec::new(HistogramOpts::new("l", "l"), &["kind"]).expect("h");
        let metrics = HttpAuthMetrics::new(&requests, &latency).expect("metrics");
        match HttpAuth::new(&cfg, metrics) {
            // A machine without a CA store cannot build it at all.
            Err(HttpAuthError::Roots(_)) => {}
            Err(e) => panic!("{e}"),
            Ok(system) => {
                assert!(!allowed(&system.check(&creds("c", Some(b"pw"))).await));
                assert_eq!(count(&requests, "connect", "error"), 1);
            }
        }
        assert_eq!(svc.pending(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_to_build_from_a_bad_configuration() {
        let requests = IntCounterVec::new(Opts::new("r", "r"), &["kind", "outcome"]).expect("c");
        let latency = HistogramVec::new(HistogramOpts::new("l", "l"), &["kind"]).expect("h");
        let metrics = || HttpAuthMetrics::new(&requests, &latency).expect("metrics");
        let remote = HttpAuthConfig {
            connect_url: "http://auth.example.com/connect".into(),
            ..HttpAuthConfig::default()
        };
        assert!(matches!(
            HttpAuth::new(&remote, metrics()),
            Err(HttpAuthError::Config(_))
        ));
        let no_ca = HttpAuthConfig {
            connect_url: "https://127.0.0.1/connect".into(),
            ca_file: Some("/nonexistent/tern-ca.pem".into()),
            ..HttpAuthConfig::default()
        };
        let err = HttpAuth::new(&no_ca, metrics())
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.starts_with("auth.http.ca_file: ")),
            "{err:?}"
        );
    }
}
