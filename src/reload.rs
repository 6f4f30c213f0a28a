//! Applying a new configuration to a running broker (SIGHUP).
//!
//! A reload is all or nothing: every part of the new configuration is read and checked first
//! (values, password file, ACL file, TLS certificates, log filter) and only then applied, so a
//! mistake in any of them leaves the running configuration whole. What can change without a
//! restart:
//! - `log.level`;
//! - `auth.*`: password file, ACL file and `allow_anonymous`, for every later check, also on
//!   existing connections (ACLs are checked per message);
//! - a TLS or WSS listener's `cert`, `key`, `client_ca`, `require_client_cert`, `crl_file`,
//!   and every listener's `[listeners.NAME.auth]` and `[listeners.NAME.limits]` (new
//!   connections);
//! - `limits.*`: broker-wide ones (`max_connections`, `max_connect_rate`,
//!   `max_retained_messages`, `backpressure`) at once; the others for connections and sessions
//!   made afterwards, because a connection's CONNACK already told its client the old values
//!   (Receive Maximum, Maximum Packet Size, Server Keep Alive ...);
//! - `sys_topics.interval`;
//! - `[[queues]]`: declared queues added, changed or removed (`broker/shared/queues.rs`);
//! - `[[bridges]]`: bridges added, changed (restarted) or removed (`bridge/mod.rs`).
//!
//! Anything else (a listener added or removed, its bind, kind, mount point, PROXY protocol,
//! WebSocket path; storage, metrics, mqtt, shared, server, log.format) is reported as needing
//! a restart and keeps its running value.

use crate::auth::AuthError;
use crate::broker::Broker;
use crate::config::{Config, ConfigError};
use crate::logging::LogHandle;
use crate::metrics::{Metrics, ReloadResult};
use crate::tls::{TlsError, TlsReloader};
use std::sync::Arc;

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Changes in force now, as `key old -> new`.
    pub applied: Vec<String>,
    /// Changes that wait for a restart, as `key old -> new`.
    pub needs_restart: Vec<String>,
}

/// Why a new configuration was refused (the running one stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("auth reload failed: {0}")]
    Auth(#[from] AuthError),
    #[error("listeners.{listener}: TLS reload failed: {source}")]
    Tls { listener: String, source: TlsError },
    #[error("configuration key `log.level`: {0}")]
    Log(String),
    #[error(transparent)]
    Bridge(#[from] crate::bridge::BridgeError),
    #[error("metrics: TLS reload failed: {0}")]
    MetricsTls(TlsError),
    #[error(transparent)]
    Admin(#[from] crate::admin::TokenError),
}

/// Keys (or key prefixes ending in '.') a reload applies; a listener's own are in
/// [`LISTENER_RELOADABLE`].
const RELOADABLE: [&str; 9] = [
    "admin.token_file",
    "metrics.cert",
    "metrics.key",
    "limits.",
    "queues",
    "bridges",
    "auth.",
    "log.level",
    "sys_topics.",
];

/// What a reload applies to a listener that is in both configurations (after
/// `listeners.NAME.`); adding or removing a listener takes a restart.
const LISTENER_RELOADABLE: [&str; 7] = [
    "cert",
    "key",
    "client_ca",
    "require_client_cert",
    "crl_file",
    "auth.",
    "limits.",
];

fn matches_any(list: &[&str], key: &str) -> bool {
    list.iter()
        .any(|r| key == *r || (r.ends_with('.') && key.starts_with(r)))
}

/// Whether a reload applies `key`; `both(name)`: listener `name` is in both configurations.
fn reloadable_with(key: &str, both: impl Fn(&str) -> bool) -> bool {
    if let Some(rest) = key.strip_prefix("listeners.") {
        let Some((name, own)) = rest.split_once('.') else {
            return false;
        };
        return both(name) && matches_any(&LISTENER_RELOADABLE, own);
    }
    matches_any(&RELOADABLE, key)
}

#[cfg(test)]
fn reloadable(key: &str) -> bool {
    reloadable_with(key, |_| true)
}

/// The running configuration with `new`'s reloadable parts: what is in force after a reload.
fn effective(running: &Config, new: &Config) -> Config {
    let mut e = running.clone();
    e.limits = new.limits.clone();
    e.auth = new.auth.clone();
    e.log.level = new.log.level.clone();
    e.sys_topics = new.sys_topics.clone();
    e.queues = new.queues.clone();
    e.bridges = new.bridges.clone();
    // The token file is re-read when the API is on; turning the API on or off takes a restart.
    if e.admin.token_file.is_some() && new.admin.token_file.is_some() {
        e.admin.token_file = new.admin.token_file.clone();
    }
    if e.metrics.cert.is_some() && new.metrics.cert.is_some() && new.metrics.key.is_some() {
        e.metrics.cert = new.metrics.cert.clone();
        e.metrics.key = new.metrics.key.clone();
    }
    for (name, t) in e.listeners.0.iter_mut() {
        if let Some(n) = new.listeners.get(name) {
            t.cert = n.cert.clone();
            t.key = n.key.clone();
            t.client_ca = n.client_ca.clone();
            t.require_client_cert = n.require_client_cert;
            t.crl_file = n.crl_file.clone();
            t.auth = n.auth.clone();
            t.limits = n.limits.clone();
        }
    }
    e
}

/// The parts of a broker a reload touches.
pub struct Target<'a> {
    pub broker: &'a Arc<Broker>,
    pub bridges: Option<&'a Arc<crate::bridge::Bridges>>,
    /// The running listeners (their settings, and the TLS ones' certificates).
    pub listeners: &'a [crate::listener::Opened],
    /// The metrics port's certificate (`metrics.cert`, `metrics.key`).
    pub metrics_tls: Option<&'a Arc<TlsReloader>>,
    /// The admin API's tokens (`admin.token_file`).
    pub admin: Option<&'a Arc<crate::admin::Tokens>>,
    pub log: Option<&'a LogHandle>,
}

/// Checks `new` against `running` and applies it; returns the configuration now in force.
/// On error nothing was changed. Either way the outcome is counted
/// (`tern_config_reloads_total{result}`), so an alert sees a reload that was refused: the
/// broker keeps running on the old configuration and nothing else would show it.
pub fn apply(
    target: &Target<'_>,
    running: &Config,
    new: &Config,
) -> Result<(Config, Reloaded), ReloadError> {
    let result = apply_checked(target, running, new);
    let metrics = &target.broker.metrics;
    match &result {
        Ok((next, _)) => {
            metrics.reloaded(ReloadResult::Success);
            publish_bounds(metrics, next);
        }
        Err(_) => metrics.reloaded(ReloadResult::Failure),
    }
    result
}

/// Puts the configured bounds of declared queues and bridges into the metrics (at start and
/// after each reload), for the "queue near its bound" alert.
pub fn publish_bounds(metrics: &Metrics, config: &Config) {
    metrics.set_queue_bounds(
        config
            .queues
            .iter()
            .map(|q| (q.name.as_str(), q.max_messages)),
        config
            .bridges
            .iter()
            .map(|b| (b.name.as_str(), b.max_queued_messages)),
    );
}

fn apply_checked(
    target: &Target<'_>,
    running: &Config,
    new: &Config,
) -> Result<(Config, Reloaded), ReloadError> {
    new.validate()?;
    let next = effective(running, new);
    // Prepare everything that reads files before anything is applied.
    let auth = target.broker.auth.prepare_here(&next.auth)?;
    let mut tls = Vec::new();
    for opened in target.listeners {
        let (Some(r), Some(cfg)) = (
            opened.tls.as_ref(),
            next.listeners.get(opened.name()).and_then(|l| l.tls()),
        ) else {
            continue;
        };
        let prepared = TlsReloader::prepare(&cfg).map_err(|source| ReloadError::Tls {
            listener: opened.name().to_string(),
            source,
        })?;
        tls.push((r, cfg, prepared));
    }
    let metrics_tls = match (target.metrics_tls, next.metrics.tls()) {
        (Some(r), Some(cfg)) => {
            let prepared = TlsReloader::prepare(&cfg).map_err(ReloadError::MetricsTls)?;
            Some((r, cfg, prepared))
        }
        _ => None,
    };
    let tokens = match (target.admin, &next.admin.token_file) {
        (Some(t), Some(path)) => Some((t, crate::admin::Tokens::prepare(path)?)),
        _ => None,
    };
    let bridges = match target.bridges {
        Some(b) if next.bridges != running.bridges => Some((
            b,
            crate::bridge::prepare(&next.bridges, next.limits.max_packet_size as usize)?,
        )),
        _ => None,
    };
    if let Some(log) = target.log {
        if next.log.level != running.log.level {
            log.set_level(&next.log.level).map_err(ReloadError::Log)?;
        }
    }
    // Nothing below can fail.
    target.broker.auth.install(auth);
    tracing::info!("password file and ACL reloaded");
    if let Some((t, prepared)) = tokens {
        t.install(prepared);
    }
    for (r, cfg, prepared) in tls.into_iter().chain(metrics_tls) {
        r.install(cfg, prepared);
        tracing::info!("TLS certificates reloaded");
    }
    for opened in target.listeners {
        if let Some(l) = next.listeners.get(opened.name()) {
            opened.door.update(l, &next);
        }
    }
    target.broker.set_limits(next.limits.clone());
    target
        .broker
        .set_sys_interval(next.sys_topics.interval.as_secs());
    if next.queues != running.queues {
        target.broker.declare_queues(&next.queues);
    }
    if let Some((b, prepared)) = bridges {
        b.reconfigure(prepared);
    }

    let mut report = Reloaded::default();
    let both =
        |name: &str| running.listeners.get(name).is_some() && new.listeners.get(name).is_some();
    for (key, old, value) in running.diff(new) {
        let line = format!("{key} {old} -> {value}");
        if reloadable_with(&key, both) {
            tracing::info!("reload: {line}");
            report.applied.push(line);
        } else {
            tracing::warn!("reload: {line} is not applied: it takes effect after a restart");
            report.needs_restart.push(line);
        }
    }
    tracing::info!(
        applied = report.applied.len(),
        needs_restart = report.needs_restart.len(),
        "configuration reloaded"
    );
    Ok((next, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloadable_keys_are_the_documented_ones() {
        for k in [
            "limits.max_packet_size",
            "auth.acl_file",
            "log.level",
            "sys_topics.interval",
            "listeners.tls.cert",
            "listeners.tls.require_client_cert",
            "listeners.devices.crl_file",
            "listeners.devices.auth.chain",
            "listeners.internal.limits.max_packet_size",
        ] {
            assert!(reloadable(k), "{k}");
        }
        for k in [
            "log.format",
            "listeners.tcp.bind",
            "listeners.tls.bind",
            "listeners.tls.use_identity_as_username",
            "listeners.devices.mount_point",
            "listeners.devices.proxy_protocol",
            "listeners.devices.kind",
            "storage.dir",
            "metrics.bind",
            "mqtt.max_qos",
            "shared.strategy",
            "server.threads",
            "cluster.node",
            "cluster.nats",
            "cluster.quorum_timeout",
            "limitsx",
        ] {
            assert!(!reloadable(k), "{k}");
        }
    }

    #[test]
    fn effective_config_keeps_restart_only_keys() {
        let running = Config::from_toml("[limits]\nmax_packet_size = 2000\n").unwrap();
        let new = Config::from_toml(
            "[limits]\nmax_packet_size = 3000\n[storage]\ndir = \"elsewhere\"\n[log]\nformat = \"json\"\nlevel = \"debug\"\n",
        )
        .unwrap();
        let e = effective(&running, &new);
        assert_eq!(e.limits.max_packet_size, 3000);
        assert_eq!(e.log.level, "debug");
        assert_eq!(e.storage.dir, running.storage.dir);
        assert_eq!(e.log.format, running.log.format);
        // [cluster] is read at start only: added, changed or removed, it waits for a restart.
        let clustered = "[cluster]\nnode = \"t1\"\nnats = [\"nats://127.0.0.1:4222\"]\n";
        let c = Config::from_toml(clustered).unwrap();
        assert_eq!(effective(&running, &c).cluster, None);
        assert_eq!(effective(&c, &running).cluster, c.cluster);
        let changed = Config::from_toml(&format!("{clustered}quorum_timeout = 9\n")).unwrap();
        assert_eq!(effective(&c, &changed).cluster, c.cluster);
        let keys: Vec<String> = c.diff(&changed).into_iter().map(|d| d.0).collect();
        assert_eq!(keys, ["cluster.quorum_timeout"]);
    }
}
