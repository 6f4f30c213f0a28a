//! Validation: the rules serde cannot express (ranges, relations between keys), each failing
//! with the key it is about.

use super::{Config, ConfigError, Limits};
use std::time::Duration;

/// A time key whose consumers count whole seconds (CONNACK's u16 and u32 fields, the `$SYS`
/// timer): `Err` with the message when `d` is a fraction of a second or above `max` seconds.
fn whole_seconds(d: Duration, max: u64, range: &str) -> Result<(), String> {
    if d.subsec_nanos() != 0 {
        return Err(format!(
            "must be a whole number of seconds, not {}",
            super::duration::display(d)
        ));
    }
    if d.as_secs() > max {
        return Err(format!("must be {range}"));
    }
    Ok(())
}

impl Config {
    /// Checks values serde cannot: ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        if let Some(jwt) = &self.auth.jwt {
            jwt.validate()?;
        }
        if let Some(http) = &self.auth.http {
            http.validate()?;
        }
        let m = &self.metrics;
        if m.cert.is_some() != m.key.is_some() {
            return invalid("metrics.cert", "`cert` and `key` go together");
        }
        if self.admin.token_file.is_some() {
            match m.bind {
                None => {
                    return invalid(
                        "admin.token_file",
                        "the admin API is served on the metrics port: set metrics.bind",
                    )
                }
                Some(addr)
                    if !addr.ip().is_loopback()
                        && m.cert.is_none()
                        && !self.admin.allow_insecure_remote =>
                {
                    return invalid(
                        "admin.token_file",
                        "the metrics port is bound beyond loopback without TLS, so admin tokens \
                         would cross the network in clear: set metrics.cert and metrics.key, bind \
                         to loopback, or set admin.allow_insecure_remote = true",
                    )
                }
                Some(_) => {}
            }
        }
        self.limits.check("limits")?;
        if self.shared.max_queued_messages == 0 {
            return invalid("shared.max_queued_messages", "must be at least 1");
        }
        if self.shared.max_queued_bytes == 0 {
            return invalid("shared.max_queued_bytes", "must be at least 1");
        }
        for g in &self.shared.groups {
            if g.name.is_empty() || g.name.contains(['/', '+', '#']) {
                return invalid(
                    "shared.groups",
                    &format!(
                        "{:?} is not a ShareName (non-empty, no '/', '+' or '#')",
                        g.name
                    ),
                );
            }
        }
        let mut names = std::collections::HashSet::new();
        for q in &self.queues {
            if !super::queue_name_ok(&q.name) {
                return invalid(
                    "queues.name",
                    &format!("{:?}: 1 to 64 letters, digits, '-', '_' or '.'", q.name),
                );
            }
            if !names.insert(q.name.as_str()) {
                return invalid("queues.name", &format!("{:?} is declared twice", q.name));
            }
            if !crate::protocol::validate::is_valid_topic_filter(&q.filter)
                || q.filter.starts_with('$')
            {
                return invalid(
                    "queues.filter",
                    &format!(
                        "queue {:?}: {:?} is not a topic filter of application topics",
                        q.name, q.filter
                    ),
                );
            }
            if q.max_messages == 0 || q.max_bytes == 0 {
                return invalid(
                    "queues.max_messages",
                    &format!("queue {:?}: limits must be at least 1", q.name),
                );
            }
        }
        self.validate_bridges()?;
        if self.mqtt.max_qos > 2 {
            return invalid("mqtt.max_qos", "must be 0, 1 or 2");
        }
        if self.mqtt.response_prefix.contains(['+', '#'])
            || self.mqtt.response_prefix.starts_with('$')
        {
            return invalid(
                "mqtt.response_prefix",
                "must be a topic name without wildcards that does not start with '$'",
            );
        }
        for (name, l) in self.listeners.iter() {
            l.validate(name, self)?;
        }
        if let Err(e) = self.log.level.parse::<tracing_subscriber::EnvFilter>() {
            return invalid("log.level", &e.to_string());
        }
        if let Err(m) = whole_seconds(
            self.sys_topics.interval,
            86_400,
            "between 0 (off) and 86400 seconds",
        ) {
            return invalid("sys_topics.interval", &m);
        }
        if self.server.threads > super::ServerConfig::MAX_THREADS {
            return invalid(
                "server.threads",
                "must be between 0 (one per CPU, less one) and 1024",
            );
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        Ok(())
    }

    /// `[[bridges]]`: names, addresses, rules and limits. Files (the secret, TLS) are read
    /// when the bridge starts and reported there.
    fn validate_bridges(&self) -> Result<(), ConfigError> {
        let invalid =
            |key: &'static str, message: String| Err(ConfigError::Invalid { key, message });
        let mut names = std::collections::HashSet::new();
        for b in &self.bridges {
            if !super::queue_name_ok(&b.name) {
                return invalid(
                    "bridges.name",
                    format!("{:?}: 1 to 64 letters, digits, '-', '_' or '.'", b.name),
                );
            }
            if !names.insert(b.name.as_str()) {
                return invalid("bridges.name", format!("{:?} is declared twice", b.name));
            }
            let port_ok = b.address.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !port_ok {
                return invalid(
                    "bridges.address",
                    format!("bridge {:?}: {:?} is not host:port", b.name, b.address),
                );
            }
            if b.protocol != "5" && b.protocol != "3.1.1" {
                return invalid(
                    "bridges.protocol",
                    format!("bridge {:?}: \"3.1.1\" or \"5\"", b.name),
                );
            }
            if b.out.is_empty() && b.inbound.is_empty() {
                return invalid(
                    "bridges.out",
                    format!("bridge {:?}: at least one `out` or `in` rule", b.name),
                );
            }
            for (key, rules) in [("bridges.out", &b.out), ("bridges.in", &b.inbound)] {
                for r in rules.iter() {
                    let filter_ok = crate::protocol::validate::is_valid_topic_filter(&r.filter)
                        && !r.filter.starts_with('$');
                    let prefix_ok = |p: &str| !p.contains(['+', '#']) && !p.starts_with('$');
                    if !filter_ok
                        || r.qos > 2
                        || !prefix_ok(&r.local_prefix)
                        || !prefix_ok(&r.remote_prefix)
                    {
                        return invalid(
                            key,
                            format!(
                                "bridge {:?}: rule {:?}: a topic filter of application topics, qos 0 to 2, prefixes without wildcards",
                                b.name, r.filter
                            ),
                        );
                    }
                }
            }
            if b.max_queued_messages == 0
                || b.max_queued_bytes == 0
                || b.window == 0
                || b.window > 65_535
            {
                return invalid(
                    "bridges.max_queued_messages",
                    format!(
                        "bridge {:?}: limits and window must be at least 1 (window at most 65535)",
                        b.name
                    ),
                );
            }
            if b.keep_alive.as_secs() > 65_535 {
                return invalid(
                    "bridges.keep_alive",
                    format!("bridge {:?}: at most 65535 seconds", b.name),
                );
            }
        }
        Ok(())
    }
}

impl super::ClusterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        // Names become NATS tokens and JetStream names: keep them to what both accept.
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 32
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !name_ok(&self.node) {
            return invalid(
                "cluster.node",
                "1 to 32 letters, digits, '-' or '_', unique in the cluster",
            );
        }
        if !name_ok(&self.prefix) {
            return invalid("cluster.prefix", "1 to 32 letters, digits, '-' or '_'");
        }
        if self.nats.is_empty() || self.nats.iter().any(|u| u.trim().is_empty()) {
            return invalid(
                "cluster.nats",
                "at least one NATS server URL, e.g. [\"nats://127.0.0.1:4222\"]",
            );
        }
        if !(1..=5).contains(&self.replicas) {
            return invalid("cluster.replicas", "between 1 and 5 (JetStream's limit)");
        }
        if !(1..=self.replicas).contains(&self.consumer_replicas) {
            return invalid(
                "cluster.consumer_replicas",
                "between 1 and cluster.replicas (a consumer has at most its stream's replicas)",
            );
        }
        if self.quorum_timeout < Duration::from_millis(100)
            || self.quorum_timeout > Duration::from_secs(300)
        {
            return invalid("cluster.quorum_timeout", "between 100ms and 300 seconds");
        }
        if self.heartbeat_ttl < Duration::from_secs(1)
            || self.heartbeat_ttl > Duration::from_secs(3600)
        {
            return invalid("cluster.heartbeat_ttl", "between 1 and 3600 seconds");
        }
        if self.connect_timeout < Duration::from_secs(1) {
            return invalid("cluster.connect_timeout", "at least 1 second");
        }
        if self.stream_max_age < Duration::from_secs(60) {
            return invalid("cluster.stream_max_age", "at least 60 seconds");
        }
        if self.stream_max_bytes < 1 << 20 {
            return invalid("cluster.stream_max_bytes", "at least 1048576 (1 MiB)");
        }
        Ok(())
    }
}

impl Limits {
    /// The ranges of the per-client and broker-wide limits, for `[limits]` and for a
    /// listener's limits merged over it (`section` names the table in the error: `limits`,
    /// `listeners.NAME.limits`).
    pub fn check(&self, section: &str) -> Result<(), ConfigError> {
        let l = self;
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Value {
                key: format!("{section}.{key}"),
                message: message.to_string(),
            })
        };
        if l.max_packet_size < 64 || l.max_packet_size > 268_435_460 {
            return invalid("max_packet_size", "must be between 64 and 268435460 bytes");
        }
        // Counts a client or the broker cannot work with at 0.
        for (key, zero) in [
            ("receive_maximum", l.receive_maximum == 0),
            ("max_inflight", l.max_inflight == 0),
            ("max_queued_messages", l.max_queued_messages == 0),
            ("max_queued_bytes", l.max_queued_bytes == 0),
            (
                "max_queued_messages_persistent",
                l.max_queued_messages_persistent == 0,
            ),
            (
                "max_queued_bytes_persistent",
                l.max_queued_bytes_persistent == 0,
            ),
            ("max_connections", l.max_connections == 0),
            ("max_inbound_qos2", l.max_inbound_qos2 == 0),
        ] {
            if zero {
                return invalid(key, "must be at least 1");
            }
        }
        if let Err(m) = whole_seconds(
            l.max_keepalive,
            u64::from(u16::MAX),
            "between 0 (no limit) and 65535 seconds",
        ) {
            return invalid("max_keepalive", &m);
        }
        if let Err(m) = whole_seconds(
            l.max_session_expiry,
            u64::from(u32::MAX),
            "between 0 and 4294967295 seconds (never expires)",
        ) {
            return invalid("max_session_expiry", &m);
        }
        // At most a day: a timeout is added to the clock, and a deadline beyond what an
        // `Instant` can hold would panic; nothing sensible waits longer for a peer anyway.
        let day = Duration::from_secs(86_400);
        if l.connect_timeout < Duration::from_secs(1) || l.connect_timeout > day {
            return invalid("connect_timeout", "must be between 1 second and 1 day");
        }
        if l.write_timeout < Duration::from_secs(1) || l.write_timeout > day {
            return invalid("write_timeout", "must be between 1 second and 1 day");
        }
        if l.max_topic_length == 0 || l.max_topic_length > 65535 {
            return invalid("max_topic_length", "must be between 1 and 65535 bytes");
        }
        if l.max_topic_levels == 0 || l.max_topic_levels > 65535 {
            return invalid("max_topic_levels", "must be between 1 and 65535");
        }
        if l.max_publish_bytes_rate != 0 && l.max_publish_bytes_rate < l.max_packet_size {
            return invalid(
                "max_publish_bytes_rate",
                "must be 0 (no limit) or at least max_packet_size bytes per second",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogFormat;

    #[test]
    fn bad_value_is_an_error_naming_the_key() {
        let err = Config::from_toml("[mqtt]\nmax_qos = 3\n").unwrap_err();
        assert!(err.to_string().contains("mqtt.max_qos"), "{err}");
        let err = Config::from_toml("[limits]\nmax_inflight = \"many\"\n").unwrap_err();
        assert!(err.to_string().contains("max_inflight"), "{err}");
    }

    #[test]
    fn abuse_limits_out_of_range_name_the_key() {
        for (text, key) in [
            (
                "[limits]\nmax_topic_length = 0\n",
                "limits.max_topic_length",
            ),
            (
                "[limits]\nmax_topic_length = 65536\n",
                "limits.max_topic_length",
            ),
            (
                "[limits]\nmax_topic_levels = 0\n",
                "limits.max_topic_levels",
            ),
            (
                "[limits]\nmax_publish_bytes_rate = 1000\n",
                "limits.max_publish_bytes_rate",
            ),
            ("[limits]\nmax_connect_rate = -1\n", "max_connect_rate"),
            ("[limits]\nmax_publish_rate = -5\n", "max_publish_rate"),
            ("[limits]\nmax_subscriptions = -1\n", "max_subscriptions"),
        ] {
            let err = Config::from_toml(text).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let c = Config::from_toml(
            "[limits]\nmax_connect_rate = 50\nmax_publish_rate = 200\nmax_publish_bytes_rate = 2097152\nmax_subscriptions = 10\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_publish_rate, 200);
    }

    /// The range of each time key, in any unit: whole seconds where the consumer counts seconds
    /// (CONNACK fields, the `$SYS` timer), between 1 s and 1 d for the timeouts.
    #[test]
    fn time_keys_out_of_range_name_the_key() {
        for (text, key) in [
            ("[limits]\nmax_keepalive = 65536\n", "limits.max_keepalive"),
            (
                "[limits]\nmax_keepalive = \"19h\"\n",
                "limits.max_keepalive",
            ),
            (
                "[limits]\nmax_keepalive = \"1500ms\"\n",
                "limits.max_keepalive",
            ),
            (
                "[limits]\nmax_session_expiry = 4294967296\n",
                "limits.max_session_expiry",
            ),
            (
                "[limits]\nmax_session_expiry = \"49711d\"\n",
                "limits.max_session_expiry",
            ),
            (
                "[limits]\nmax_session_expiry = \"10ms\"\n",
                "limits.max_session_expiry",
            ),
            ("[limits]\nconnect_timeout = 0\n", "limits.connect_timeout"),
            (
                "[limits]\nconnect_timeout = \"999ms\"\n",
                "limits.connect_timeout",
            ),
            ("[limits]\nwrite_timeout = \"0s\"\n", "limits.write_timeout"),
            ("[limits]\nwrite_timeout = \"2d\"\n", "limits.write_timeout"),
            (
                "[limits]\nconnect_timeout = 9223372036854775807\n",
                "limits.connect_timeout",
            ),
            (
                "[sys_topics]\ninterval = \"1500ms\"\n",
                "sys_topics.interval",
            ),
            ("[sys_topics]\ninterval = \"2d\"\n", "sys_topics.interval"),
            ("[server]\nthreads = 1025\n", "server.threads"),
        ] {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("configuration key `{key}`: must be")),
                "{text}: {err}"
            );
        }
        let c = Config::from_toml(
            "[limits]\nmax_keepalive = \"1h\"\nmax_session_expiry = \"49710d\"\nconnect_timeout = \"1500ms\"\nwrite_timeout = \"1s\"\n[sys_topics]\ninterval = \"1d\"\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_keepalive_secs(), 3600);
        assert_eq!(c.limits.max_session_expiry_secs(), 49_710 * 86_400);
        assert_eq!(c.limits.connect_timeout, Duration::from_millis(1500));
        assert_eq!(c.sys_topics.interval, Duration::from_secs(86_400));
        let c =
            Config::from_toml("[limits]\nmax_keepalive = 65535\nmax_session_expiry = 4294967295\n")
                .unwrap();
        assert_eq!(c.limits.max_keepalive_secs(), u16::MAX);
        assert_eq!(c.limits.max_session_expiry_secs(), u32::MAX);
        assert_eq!(Config::default().limits.max_session_expiry_secs(), u32::MAX);
    }

    #[test]
    fn sys_topics_and_log_format_parse_and_validate() {
        let c =
            Config::from_toml("[sys_topics]\ninterval = 0\n[log]\nformat = \"json\"\n").unwrap();
        assert_eq!(c.sys_topics.interval, Duration::ZERO);
        assert_eq!(c.log.format, LogFormat::Json);
        let err = Config::from_toml("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(err.to_string().contains("xml"), "{err}");
        let err = Config::from_toml("[sys_topics]\ninterval = 100000\n").unwrap_err();
        assert!(err.to_string().contains("sys_topics.interval"), "{err}");
    }
}
