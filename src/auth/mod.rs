//! Authentication and authorisation: who may connect, publish where, subscribe to what, and
//! receive which message.
//!
//! Checked at CONNECT (password file), at PUBLISH and for the will at CONNECT, at SUBSCRIBE,
//! and on every delivery path (live, retained, offline replay) through [`ReceiveRule`]. The
//! protocol's own rules always apply: `$` topics belong to the broker, and a Response
//! Information prefix belongs to its client. `[auth] password_file` and `acl_file` add
//! Mosquitto-compatible users and rules; both are reloaded on SIGHUP.

pub mod acl;
pub mod chain;
pub mod client;
pub mod http;
pub mod jwt;
pub mod password;

use crate::config::{AclMode, AuthConfig, Backend};
use acl::Acl;
use password::PasswordFile;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use tokio::sync::watch;

/// Errors loading the password or ACL file (the broker refuses to start; a reload keeps the
/// old rules).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth.password_file: {0}")]
    Password(#[from] password::PasswordError),
    #[error("auth.acl_file: {0}")]
    Acl(#[from] acl::AclError),
    #[error("{0}")]
    Jwt(#[from] jwt::JwtError),
    #[error("{0}")]
    Http(#[from] http::HttpAuthError),
}

#[derive(Default)]
struct Rules {
    passwords: Option<Arc<PasswordFile>>,
    acl: Option<Arc<Acl>>,
    /// `[auth.jwt]`: its keys, and the JWKS refreshed in the background.
    jwt: Option<Arc<jwt::Jwt>>,
    /// `[auth.http]`: the service's client, its request slots and its answers' cache.
    http: Option<Arc<http::HttpAuth>>,
}

/// Password file, ACL and anonymous access read from a configuration, not yet in force.
pub struct PreparedAuth {
    rules: Rules,
    allow_anonymous: bool,
    files: AuthConfig,
}

pub struct Authorizer {
    /// `mqtt.response_prefix`; empty when Response Information is off.
    response_prefix: String,
    /// `mqtt.reserve_response_topics`: only a client may subscribe under its own Response
    /// Information topic (and receive what is published there).
    reserve_responses: bool,
    /// `auth.allow_anonymous`; a reload may change it.
    allow_anonymous: AtomicBool,
    rules: RwLock<Rules>,
    /// Whether an ACL is loaded: lets every publish skip the lock when none is configured.
    acl_on: AtomicBool,
    /// The `[auth]` settings in force: the admin API edits the files they name.
    files: RwLock<AuthConfig>,
    /// Stops the JWKS refresh task of the JWT backend in force (a reload starts another).
    jwt_refresh: Mutex<Option<watch::Sender<bool>>>,
    /// The HTTP backend's counters (`tern_auth_http_*`), kept across reloads.
    http_metrics: http::HttpAuthMetrics,
    /// Failed JWKS fetches of the JWT backends replaced by reloads (each counts its own).
    jwks_failures_before: std::sync::atomic::AtomicU64,
}

/// Starts `jwt`'s JWKS refresh in the background, on the runtime the caller runs on (none in
/// `tern check`, which refreshes nothing); the sender stops it.
fn start_refresh(jwt: &Arc<jwt::Jwt>) -> Option<watch::Sender<bool>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (stop, stopped) = watch::channel(false);
    runtime.spawn(jwt.clone().run_refresh(stopped));
    Some(stop)
}

fn load_rules(cfg: &AuthConfig, http_metrics: &http::HttpAuthMetrics) -> Result<Rules, AuthError> {
    Ok(Rules {
        passwords: match &cfg.password_file {
            Some(p) => Some(Arc::new(PasswordFile::load(p)?)),
            None => None,
        },
        acl: match &cfg.acl_file {
            Some(p) => Some(Arc::new(acl::load(p)?)),
            None => None,
        },
        jwt: match &cfg.jwt {
            Some(j) => Some(Arc::new(jwt::Jwt::new(j)?)),
            None => None,
        },
        http: match &cfg.http {
            Some(h) => Some(Arc::new(http::HttpAuth::new(h, http_metrics.clone())?)),
            None => None,
        },
    })
}

impl Authorizer {
    /// Without password or ACL files (tests, and the protocol-only rules).
    pub fn new(response_prefix: &str) -> Authorizer {
        Authorizer {
            response_prefix: response_prefix.trim_end_matches('/').to_string(),
            reserve_responses: true,
            allow_anonymous: AtomicBool::new(false),
            rules: RwLock::new(Rules::default()),
            acl_on: AtomicBool::new(false),
            files: RwLock::new(AuthConfig::default()),
            jwt_refresh: Mutex::new(None),
            http_metrics: http::HttpAuthMetrics::default(),
            jwks_failures_before: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Loads the configured password and ACL files and backends (the HTTP backend counting
    /// nowhere: tests).
    pub fn load(response_prefix: &str, cfg: &AuthConfig) -> Result<Authorizer, AuthError> {
        Self::load_counted(response_prefix, cfg, http::HttpAuthMetrics::default())
    }

    /// [`Self::load`], the HTTP backend counting in `http_metrics` (the broker's).
    pub fn load_counted(
        response_prefix: &str,
        cfg: &AuthConfig,
        http_metrics: http::HttpAuthMetrics,
    ) -> Result<Authorizer, AuthError> {
        let rules = load_rules(cfg, &http_metrics)?;
        Ok(Authorizer {
            response_prefix: response_prefix.trim_end_matches('/').to_string(),
            reserve_responses: true,
            allow_anonymous: AtomicBool::new(cfg.allow_anonymous),
            acl_on: AtomicBool::new(rules.acl.is_some()),
            rules: RwLock::new(rules),
            files: RwLock::new(cfg.clone()),
            // Started by `fetch_keys`, after the first fetch.
            jwt_refresh: Mutex::new(None),
            http_metrics,
            jwks_failures_before: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Re-reads the password and ACL files (SIGHUP). On error the old rules stay.
    pub fn reload(&self, cfg: &AuthConfig) -> Result<(), AuthError> {
        self.install(self.prepare_here(cfg)?);
        Ok(())
    }

    /// Reads and checks the files of `cfg` without applying them, so a reload can check
    /// every part of a new configuration before it changes anything (`tern check`: counted
    /// nowhere).
    pub fn prepare(cfg: &AuthConfig) -> Result<PreparedAuth, AuthError> {
        Self::prepare_counted(cfg, &http::HttpAuthMetrics::default())
    }

    /// [`Self::prepare`] for this authorizer: the HTTP backend counts in its metrics.
    pub fn prepare_here(&self, cfg: &AuthConfig) -> Result<PreparedAuth, AuthError> {
        Self::prepare_counted(cfg, &self.http_metrics)
    }

    fn prepare_counted(
        cfg: &AuthConfig,
        http_metrics: &http::HttpAuthMetrics,
    ) -> Result<PreparedAuth, AuthError> {
        Ok(PreparedAuth {
            rules: load_rules(cfg, http_metrics)?,
            allow_anonymous: cfg.allow_anonymous,
            files: cfg.clone(),
        })
    }

    /// Applies prepared rules: every later check (also on existing connections) uses them.
    pub fn install(&self, p: PreparedAuth) {
        let on = p.rules.acl.is_some();
        let new_jwt = p.rules.jwt.clone();
        let old = std::mem::replace(
            &mut *self.rules.write().unwrap_or_else(PoisonError::into_inner),
            p.rules,
        );
        // The JWT backend is made anew from the reloaded settings; keys already fetched from
        // the same JWKS stay valid (a reload during an identity provider's outage must not
        // lock everyone out), and the old backend's refresh stops.
        if let (Some(new), Some(old)) = (&new_jwt, &old.jwt) {
            new.carry_over(old);
        }
        if let Some(old) = &old.jwt {
            self.jwks_failures_before
                .fetch_add(old.refresh_failures(), Ordering::Relaxed);
        }
        let refresh = new_jwt.as_ref().and_then(start_refresh);
        let previous = std::mem::replace(
            &mut *self
                .jwt_refresh
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            refresh,
        );
        if let Some(stop) = previous {
            let _ = stop.send(true);
        }
        self.acl_on.store(on, Ordering::Release);
        self.allow_anonymous
            .store(p.allow_anonymous, Ordering::Release);
        *self.files.write().unwrap_or_else(PoisonError::into_inner) = p.files;
    }

    /// The `[auth]` settings in force (the files the admin API edits).
    pub fn settings(&self) -> AuthConfig {
        self.files
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn acl(&self) -> Option<Arc<Acl>> {
        if !self.acl_on.load(Ordering::Acquire) {
            return None;
        }
        self.rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .acl
            .clone()
    }

    pub fn has_acl(&self) -> bool {
        self.acl().is_some()
    }

    /// CONNECT's user name and password against the password file alone (no chain): what a
    /// listener without `[listeners.NAME.auth]` did before chains existed. Tests.
    #[cfg(test)]
    pub fn authenticate_password(
        &self,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<(), chain::Denial> {
        let creds = chain::Credentials {
            client_id: "",
            username,
            password,
            listener: "tcp",
            peer: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            protocol: 4,
        };
        let passwords = self.passwords();
        let backends: &[Backend] = if passwords.is_some() {
            &[Backend::PasswordFile]
        } else {
            &[]
        };
        let anonymous = self.allow_anonymous.load(Ordering::Acquire);
        // The password file never waits: the future is ready at its first poll.
        let decided =
            futures_util::FutureExt::now_or_never(self.authenticate(backends, anonymous, &creds))
                .unwrap_or(Err(chain::Denial::NotAuthorized));
        decided.map(|_| ())
    }

    fn http(&self) -> Option<Arc<http::HttpAuth>> {
        self.rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .http
            .clone()
    }

    /// Fetches the JWT backend's JWKS once (bounded by `auth.jwt.jwks_timeout`), then starts
    /// its background refresh: tokens signed with its keys are accepted from the first
    /// CONNECT. Without it, a fleet reconnecting right after a restart would be refused as bad
    /// credentials until a background fetch landed. A failure is logged; the background
    /// refresh tries again.
    pub async fn fetch_keys(&self) {
        let Some(jwt) = self.jwt() else {
            return;
        };
        if jwt.has_jwks() {
            match jwt.refresh(std::time::SystemTime::now()).await {
                Ok(keys) => tracing::info!(keys, "auth.jwt: JWKS fetched"),
                Err(e) => {
                    tracing::warn!(error = %e, "auth.jwt: the JWKS could not be fetched at start; tokens signed with its keys are refused until it is")
                }
            }
        }
        let refresh = start_refresh(&jwt);
        if let Some(old) = std::mem::replace(
            &mut *self
                .jwt_refresh
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            refresh,
        ) {
            let _ = old.send(true);
        }
    }

    /// Failed JWKS fetches since start, across reloads (`tern_auth_jwks_fetch_failures_total`).
    pub fn jwks_failures(&self) -> u64 {
        self.jwks_failures_before.load(Ordering::Relaxed)
            + self.jwt().map_or(0, |j| j.refresh_failures())
    }

    /// The HTTP backend when it authorises topics too (`auth.http.acl_url`).
    pub fn http_acl(&self) -> Option<Arc<http::HttpAuth>> {
        self.http().filter(|h| h.has_acl())
    }

    fn jwt(&self) -> Option<Arc<jwt::Jwt>> {
        self.rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .jwt
            .clone()
    }

    fn passwords(&self) -> Option<Arc<PasswordFile>> {
        self.rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .passwords
            .clone()
    }

    /// The password file as a backend: it decides for the users it knows and passes the
    /// others (and clients without a username).
    fn password_decision(&self, c: &chain::Credentials<'_>) -> chain::Decision {
        let (Some(user), Some(file)) = (c.username, self.passwords()) else {
            return chain::Decision::Pass;
        };
        if !file.contains(user) {
            return chain::Decision::Pass;
        }
        if file.verify(user, c.password.unwrap_or(b"")) {
            chain::Decision::Allow(chain::Grant::default())
        } else {
            chain::Decision::Deny(chain::Denial::BadCredentials)
        }
    }

    /// What is left when every backend passed: an anonymous client where anonymous clients
    /// are allowed (and, with no backend at all, a username is only an identity, as it was
    /// before chains existed); anyone else is refused.
    fn nobody_decided(
        chain: &[Backend],
        allow_anonymous: bool,
        c: &chain::Credentials<'_>,
    ) -> Result<chain::Grant, chain::Denial> {
        match c.username {
            None if allow_anonymous => Ok(chain::Grant::default()),
            None => Err(chain::Denial::NotAuthorized),
            Some(_) if allow_anonymous && chain.is_empty() => Ok(chain::Grant::default()),
            Some(_) => Err(chain::Denial::BadCredentials),
        }
    }

    /// CONNECT's credentials through a listener's `chain`: the first backend that decides
    /// wins; when all pass, [`Self::nobody_decided`]. Awaits only the HTTP backend, in the
    /// connection's own task, so a slow service holds up only the clients it is asked about.
    pub async fn authenticate(
        &self,
        chain: &[Backend],
        allow_anonymous: bool,
        c: &chain::Credentials<'_>,
    ) -> Result<chain::Grant, chain::Denial> {
        for b in chain {
            let d = match b {
                Backend::PasswordFile => self.password_decision(c),
                Backend::Jwt => match self.jwt() {
                    Some(jwt) => jwt.check(c, std::time::SystemTime::now()),
                    // Validation keeps a chain from naming a backend that is not configured.
                    None => chain::Decision::Deny(chain::Denial::NotAuthorized),
                },
                Backend::Http => match self.http() {
                    Some(http) => http.check(c).await,
                    None => chain::Decision::Deny(chain::Denial::NotAuthorized),
                },
            };
            match d {
                chain::Decision::Allow(g) => return Ok(g),
                chain::Decision::Deny(d) => return Err(d),
                chain::Decision::Pass => {}
            }
        }
        Self::nobody_decided(chain, allow_anonymous, c)
    }

    /// The Response Information handed to `client_id`, if enabled.
    pub fn response_information(&self, client_id: &str) -> Option<String> {
        (!self.response_prefix.is_empty())
            .then(|| format!("{}/{}", self.response_prefix, client_id))
    }

    /// Whether the topics under each client's Response Information belong to that client
    /// alone (`mqtt.reserve_response_topics`; off, the prefix is only handed out).
    pub fn reserving_responses(mut self, on: bool) -> Authorizer {
        self.reserve_responses = on;
        self
    }

    /// The owner of `topic` when it lies under the response prefix and those topics are
    /// reserved.
    fn response_owner<'a>(&self, topic: &'a str) -> Option<&'a str> {
        if self.response_prefix.is_empty() || !self.reserve_responses {
            return None;
        }
        let rest = topic
            .strip_prefix(self.response_prefix.as_str())?
            .strip_prefix('/')?;
        Some(rest.split('/').next().unwrap_or(rest))
    }

    /// Clients may not publish to topics the broker owns (`$SYS/...` and every `$` topic),
    /// nor where the ACL gives them no write access.
    pub fn can_publish(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        !topic.starts_with('$')
            && self
                .acl()
                .is_none_or(|acl| acl.can_publish(username, client_id, topic))
    }

    /// A filter under another client's response prefix is refused (so is a wildcard in the
    /// level that names the owner); with an ACL, a read rule must cover the whole filter.
    pub fn can_subscribe(&self, username: Option<&str>, client_id: &str, filter: &str) -> bool {
        let own = match self.response_owner(filter) {
            Some(owner) => owner == client_id,
            None => true,
        };
        own && self
            .acl()
            .is_none_or(|acl| acl.can_subscribe(username, client_id, filter))
    }

    /// [`Self::can_subscribe`] as a listener's `acl_mode` has it: with
    /// [`AclMode::PerMessage`] the ACL is not asked here (it decides per delivered message,
    /// as Mosquitto does); the protocol's own rules still apply.
    pub fn can_subscribe_in(
        &self,
        mode: AclMode,
        username: Option<&str>,
        client_id: &str,
        filter: &str,
    ) -> bool {
        match mode {
            AclMode::Subscribe => self.can_subscribe(username, client_id, filter),
            AclMode::PerMessage => self
                .response_owner(filter)
                .is_none_or(|owner| owner == client_id),
        }
    }

    /// Delivery check: response topics reach only their owner, even through `#`; with an ACL
    /// only clients with read access receive.
    pub fn can_receive(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.receive_rule(topic).allows(username, client_id)
    }

    /// The delivery check for one topic, worked out once per message rather than once per
    /// subscriber (fan-out to many sessions asks it many times).
    pub fn receive_rule<'a>(&self, topic: &'a str) -> ReceiveRule<'a> {
        ReceiveRule {
            topic,
            owner: self.response_owner(topic),
            acl: self.acl(),
        }
    }
}

/// Who may receive a message on a given topic.
pub struct ReceiveRule<'a> {
    topic: &'a str,
    owner: Option<&'a str>,
    acl: Option<Arc<Acl>>,
}

impl ReceiveRule<'_> {
    /// Whether the check needs the receiver's user name (an ACL is configured).
    pub fn needs_username(&self) -> bool {
        self.acl.is_some()
    }

    pub fn allows(&self, username: Option<&str>, client_id: &str) -> bool {
        self.owner.is_none_or(|o| o == client_id)
            && self
                .acl
                .as_ref()
                .is_none_or(|acl| acl.can_receive(username, client_id, self.topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_prefix_belongs_to_its_client() {
        let a = Authorizer::new("reply");
        assert_eq!(a.response_information("c1").as_deref(), Some("reply/c1"));
        assert!(a.can_subscribe(None, "c1", "reply/c1/#"));
        assert!(a.can_subscribe(None, "c1", "reply/c1"));
        assert!(!a.can_subscribe(None, "c2", "reply/c1/#"));
        assert!(!a.can_subscribe(None, "c2", "reply/+/x"));
        assert!(a.can_subscribe(None, "c2", "replyx/c1"));
        assert!(a.can_receive(None, "c1", "reply/c1/x"));
        assert!(!a.can_receive(None, "c2", "reply/c1/x"));
        assert!(a.can_receive(None, "c2", "other"));
    }

    #[test]
    fn dollar_topics_are_the_brokers() {
        let a = Authorizer::new("");
        assert!(!a.can_publish(None, "c", "$SYS/x"));
        assert!(a.can_publish(None, "c", "a/$b"));
        assert_eq!(a.response_information("c"), None);
        assert!(a.can_receive(None, "c", "reply/x/y"));
    }

    #[test]
    fn password_file_and_acl_apply() {
        let dir = std::env::temp_dir().join(format!("tern-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut pw = PasswordFile::default();
        pw.set("alice", b"secret").unwrap();
        let pw_path = dir.join("passwd");
        pw.save(&pw_path).unwrap();
        let acl_path = dir.join("acl");
        std::fs::write(&acl_path, "user alice\ntopic readwrite a/#\n").unwrap();
        let cfg = AuthConfig {
            allow_anonymous: false,
            password_file: Some(pw_path),
            acl_file: Some(acl_path),
            ..AuthConfig::default()
        };
        let a = Authorizer::load("reply", &cfg).unwrap();
        assert_eq!(
            a.authenticate_password(Some("alice"), Some(b"secret")),
            Ok(())
        );
        assert_eq!(
            a.authenticate_password(Some("alice"), Some(b"nope")),
            Err(chain::Denial::BadCredentials)
        );
        assert_eq!(
            a.authenticate_password(Some("bob"), Some(b"secret")),
            Err(chain::Denial::BadCredentials)
        );
        assert_eq!(
            a.authenticate_password(None, None),
            Err(chain::Denial::NotAuthorized)
        );
        assert!(a.can_publish(Some("alice"), "c", "a/b"));
        assert!(!a.can_publish(Some("alice"), "c", "b"));
        assert!(a.can_subscribe(Some("alice"), "c", "a/+"));
        assert!(!a.can_subscribe(Some("alice"), "c", "#"));
        assert!(a.can_receive(Some("alice"), "c", "a/x"));
        assert!(!a.can_receive(None, "c", "a/x"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
