//! Typed configuration.
//!
//! Layering is built-in defaults < the file given with `--config` < environment variables
//! `TERN__SECTION__KEY` (for example `TERN__LIMITS__MAX_QUEUED_MESSAGES=5000`). Every struct
//! denies unknown keys so a typo is a startup error that names the full key path instead of a
//! setting that silently does nothing.
//!
//! The parts: this module holds the types, their built-in defaults and loading;
//! [`validate`](Config::validate) (in `validate.rs`) the rules serde cannot express;
//! [`diff`](Config::diff) (in `diff.rs`) what a reload compares; [`duration`] how every time
//! key is read (`30`, `"30s"`, `"5m"` ...).

pub mod auth_http;
pub mod auth_jwt;
mod diff;
pub mod duration;
pub mod listeners;
mod validate;

pub use auth_http::HttpAuthConfig;
pub use auth_jwt::JwtConfig;
pub use listeners::{AclMode, Backend, ListenerConfig, Listeners};

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors found while loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(String),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    /// A value of the wrong form for its key, found while reading it (a [`duration`] such as
    /// `"3 parsecs"`).
    #[error("configuration key `{key}`: {message}")]
    Value { key: String, message: String },
}

impl ConfigError {
    /// The `config` crate's error as ours. A [`duration`] error gets its key in front, as
    /// validation errors have it; other errors keep the crate's wording (which names the key
    /// at the end: ``... for key `limits.max_inflight` ``).
    fn from_loader(e: config::ConfigError) -> ConfigError {
        if let config::ConfigError::At {
            error,
            key: Some(key),
            origin,
        } = &e
        {
            if let config::ConfigError::Message(message) = error.as_ref() {
                if message.starts_with(duration::ERROR_PREFIX) {
                    let message = match origin {
                        Some(origin) => format!("{message} in {origin}"),
                        None => message.clone(),
                    };
                    return ConfigError::Value {
                        key: key.clone(),
                        message,
                    };
                }
            }
        }
        ConfigError::Load(e.to_string())
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listeners: Listeners,
    pub metrics: MetricsConfig,
    /// `[admin]`: the admin API on the metrics port (docs/operations.md, "Admin API"); off
    /// without a token file.
    pub admin: AdminConfig,
    pub storage: StorageConfig,
    pub limits: Limits,
    pub mqtt: MqttConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub shared: SharedConfig,
    pub sys_topics: SysTopicsConfig,
    pub server: ServerConfig,
    /// Present: this node joins a cluster over NATS JetStream (docs/cluster.md). Absent: a
    /// single node on its embedded store. Read at start only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// `[[queues]]`: declared durable queues (docs/queues.md). Reloadable.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<QueueConfig>,
    /// `[[bridges]]`: store-and-forward bridges to other brokers (docs/bridges.md). Reloadable.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bridges: Vec<BridgeConfig>,
}

/// One `[[bridges]]` entry: Tern connects to another MQTT broker as a client, forwards the
/// local messages its `out` rules match (kept in the bridge's own durable queue while the
/// remote is unreachable) and publishes locally what its `in` rules take from the remote.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Names the bridge in metrics, logs and ACLs (`bridge:NAME`): letters, digits, `-`,
    /// `_`, `.`.
    pub name: String,
    /// `host:port` of the remote broker.
    pub address: String,
    /// `"3.1.1"` or `"5"`.
    #[serde(default = "BridgeConfig::default_protocol")]
    pub protocol: String,
    /// The client id Tern uses at the remote (default `tern-bridge-NAME`).
    #[serde(default)]
    pub client_id: String,
    /// User name at the remote; empty: none.
    #[serde(default)]
    pub username: String,
    /// A file holding the password at the remote (its whole content, a final newline
    /// removed); readable only by Tern. Empty: no password.
    #[serde(default)]
    pub secret_file: PathBuf,
    /// TLS towards the remote; absent: plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BridgeTls>,
    /// Local messages forwarded to the remote.
    #[serde(default)]
    pub out: Vec<BridgeRule>,
    /// Remote messages published locally.
    #[serde(default, rename = "in")]
    pub inbound: Vec<BridgeRule>,
    /// Messages the bridge's outgoing queue holds (on disk beyond 256) while the remote is
    /// unreachable or slower; beyond it new ones are refused and counted.
    #[serde(default = "BridgeConfig::default_max_queued_messages")]
    pub max_queued_messages: usize,
    /// Bytes (payload plus topic) the outgoing queue holds.
    #[serde(default = "BridgeConfig::default_max_queued_bytes")]
    pub max_queued_bytes: usize,
    /// QoS 1/2 messages sent to the remote and not yet acknowledged, at most (also capped by
    /// the remote's Receive Maximum).
    #[serde(default = "BridgeConfig::default_window")]
    pub window: usize,
    /// Keep alive towards the remote.
    #[serde(
        default = "BridgeConfig::default_keep_alive",
        with = "duration::seconds"
    )]
    pub keep_alive: Duration,
}

impl BridgeConfig {
    fn default_protocol() -> String {
        "5".into()
    }
    fn default_max_queued_messages() -> usize {
        1_000_000
    }
    fn default_max_queued_bytes() -> usize {
        1 << 30
    }
    /// Measured (`make bench`, bridge-drain): with 100 the bridge drained a backlog at 0.8x
    /// Mosquitto's rate, waiting on acknowledgements between windows; with 1,000 at 1.0x.
    /// A remote far away needs a window of its bandwidth times its round trip.
    fn default_window() -> usize {
        1000
    }
    fn default_keep_alive() -> Duration {
        Duration::from_secs(30)
    }

    /// The client id at the remote.
    pub fn client_id(&self) -> String {
        if self.client_id.is_empty() {
            format!("tern-bridge-{}", self.name)
        } else {
            self.client_id.clone()
        }
    }
}

/// `tls = { ca = "...", cert = "...", key = "..." }` of a bridge.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeTls {
    /// CA certificates (PEM) the remote's certificate must chain to.
    pub ca: PathBuf,
    /// Client certificate (PEM) and its key, when the remote asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The name the remote's certificate must carry; default: the host of `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// One `out` or `in` rule: a topic filter on the side messages come from, a QoS, and the
/// prefixes swapped on the way (`local_prefix` + rest <-> `remote_prefix` + rest).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeRule {
    /// `out`: a local filter; `in`: a filter subscribed to at the remote.
    pub filter: String,
    /// Highest QoS used on the way (0, 1 or 2).
    #[serde(default = "BridgeRule::default_qos")]
    pub qos: u8,
    #[serde(default)]
    pub local_prefix: String,
    #[serde(default)]
    pub remote_prefix: String,
}

impl BridgeRule {
    fn default_qos() -> u8 {
        1
    }
}

/// One `[[queues]]` entry: a queue that collects the QoS 1/2 messages matching `filter` from the
/// moment it is declared, whether or not a consumer exists, for consumers of `$queue/NAME`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Consumers subscribe to `$queue/NAME` (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// A topic filter: what the queue collects.
    pub filter: String,
    /// Messages the queue holds before `overflow` applies.
    #[serde(default = "QueueConfig::default_max_messages")]
    pub max_messages: usize,
    /// Bytes (payload plus topic) the queue holds before `overflow` applies.
    #[serde(default = "QueueConfig::default_max_bytes")]
    pub max_bytes: usize,
    /// How long a message may wait in the queue; 0 = no limit (its own Message Expiry still
    /// applies). Expired messages are dropped and counted as `reason="expired"`.
    #[serde(default, with = "duration::seconds")]
    pub message_ttl: Duration,
    /// How a message is given to one of the consumers, as for shared subscriptions.
    #[serde(default)]
    pub strategy: Strategy,
    /// What a full queue does with a new message.
    #[serde(default)]
    pub overflow: Overflow,
}

impl QueueConfig {
    fn default_max_messages() -> usize {
        1_000_000
    }
    fn default_max_bytes() -> usize {
        1 << 30
    }
}

/// What a declared queue does when it is full.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// The new message is not queued (counted as `queue_full`); a v5 publisher whose message
    /// no target took gets PUBACK 0x97 Quota exceeded.
    #[default]
    Reject,
    /// The oldest queued messages make room (counted as `overflow`).
    DropOldest,
}

/// `[cluster]`: the NATS servers this node joins through, and how durable state is kept there.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster: it names the node's JetStream consumer and
    /// marks the messages it publishes (letters, digits, `-` and `_`).
    pub node: String,
    /// Seed URLs of the NATS servers (`nats://host:port`); the client learns the others from
    /// them and reconnects to any of them.
    pub nats: Vec<String>,
    /// JetStream replicas of every stream Tern creates (1 for a single NATS server, 3 to
    /// survive the loss of one server).
    #[serde(default = "ClusterConfig::default_replicas")]
    pub replicas: usize,
    /// Replicas of this node's consumer of the messages stream (at most `replicas`). 1: its
    /// deliveries and acknowledgements cost no Raft round, and when its NATS server goes the
    /// node makes it again on another from where it was (`cluster/receive.rs`).
    #[serde(default = "ClusterConfig::default_consumer_replicas")]
    pub consumer_replicas: usize,
    /// How long a QoS 1/2 publish waits for JetStream to store it with its replicas before
    /// the publisher is told it failed (MQTT 5: reason 0x83; 3.1.1: the connection closes).
    /// The default rides out a Raft election: when a stream's leader dies, its followers wait
    /// 4 to 9 s (nats-server's `minElectionTimeoutDefault`..`maxElectionTimeoutDefault`)
    /// before they campaign, so 20 s allows one whole wait, a second round and the answer.
    /// Shorter, a publisher is refused whenever one NATS server of three dies with a leader.
    #[serde(
        default = "ClusterConfig::default_quorum_timeout",
        with = "duration::seconds"
    )]
    pub quorum_timeout: Duration,
    /// How long a node's heartbeat lives in the nodes bucket; it is renewed every third of
    /// this. A node whose heartbeat is gone is not listed as a member.
    #[serde(
        default = "ClusterConfig::default_heartbeat_ttl",
        with = "duration::seconds"
    )]
    pub heartbeat_ttl: Duration,
    /// How long startup waits for NATS and the streams before giving up.
    #[serde(
        default = "ClusterConfig::default_connect_timeout",
        with = "duration::seconds"
    )]
    pub connect_timeout: Duration,
    /// First token of every subject, stream and bucket name, so several clusters can share
    /// NATS servers.
    #[serde(default = "ClusterConfig::default_prefix")]
    pub prefix: String,
    /// How long JetStream keeps a message of the messages stream (whole seconds): a node
    /// down for longer misses what was published meanwhile.
    #[serde(
        default = "ClusterConfig::default_stream_max_age",
        with = "duration::seconds"
    )]
    pub stream_max_age: Duration,
    /// Most bytes the messages stream holds; the oldest go first.
    #[serde(default = "ClusterConfig::default_stream_max_bytes")]
    pub stream_max_bytes: u64,
    /// A NATS credentials file (`.creds`: JWT and NKey seed); empty: none.
    #[serde(default)]
    pub credentials: PathBuf,
    /// Also send each all-QoS-1 batch over core NATS, so the other nodes' clean sessions get
    /// it without waiting for JetStream (`cluster/fast.rs`); false: the stream only (half
    /// the core NATS traffic, about a millisecond more latency for them).
    #[serde(default = "ClusterConfig::default_fast_path")]
    pub fast_path: bool,
}

impl ClusterConfig {
    fn default_replicas() -> usize {
        3
    }
    fn default_consumer_replicas() -> usize {
        1
    }
    fn default_quorum_timeout() -> Duration {
        Duration::from_secs(20)
    }
    fn default_heartbeat_ttl() -> Duration {
        Duration::from_secs(10)
    }
    fn default_connect_timeout() -> Duration {
        Duration::from_secs(30)
    }
    fn default_prefix() -> String {
        "tern".to_string()
    }
    fn default_stream_max_age() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    fn default_stream_max_bytes() -> u64 {
        1 << 30
    }
    fn default_fast_path() -> bool {
        true
    }
}

/// The process itself.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Threads serving connections (the tokio runtime's workers); 0: one per CPU the process
    /// may use, less one, at least one. Read at start only.
    pub threads: usize,
}

impl ServerConfig {
    /// Most threads `threads` may ask for.
    pub const MAX_THREADS: usize = 1024;

    /// `threads`, with 0 resolved against the CPUs available to the process.
    ///
    /// Why one less than the CPUs: connection work is not the process's only work. The
    /// store's writer thread, fjall's flush and compaction threads and the kernel's network
    /// processing for our sockets need a core too; a runtime thread per CPU competes with
    /// them, and tokio's work stealing between several threads costs a cross-thread wake-up
    /// per hand-over. With one thread, tokio's single-threaded scheduler has neither
    /// (docs/operations.md, "Threads", has the measurements).
    pub fn threads(&self) -> usize {
        match self.threads {
            0 => auto_threads(std::thread::available_parallelism().map_or(1, usize::from)),
            n => n,
        }
    }
}

/// The `threads = 0` rule for a process that may use `cpus` CPUs.
fn auto_threads(cpus: usize) -> usize {
    cpus.saturating_sub(1).max(1)
}

/// Mosquitto-compatible `$SYS/broker/...` topics.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SysTopicsConfig {
    /// Time between publications, whole seconds; 0 turns `$SYS` topics off.
    #[serde(with = "duration::seconds")]
    pub interval: Duration,
}

impl Default for SysTopicsConfig {
    fn default() -> Self {
        SysTopicsConfig {
            interval: Duration::from_secs(10),
        }
    }
}

pub(crate) fn default_ws_path() -> String {
    "/mqtt".to_string()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
/// The WebSocket part of a WS or WSS listener ([`ListenerConfig::ws`]).
pub struct WsListenerConfig {
    pub bind: SocketAddr,
    /// The HTTP path MQTT is served on; other paths get 404.
    #[serde(default = "default_ws_path")]
    pub path: String,
    /// Browser origins (`scheme://host[:port]`) allowed to connect; requests with another
    /// `Origin` header get 403. Empty: any origin. Clients that send no `Origin` (not browsers)
    /// are always allowed.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
/// The TLS part of a TLS or WSS listener ([`ListenerConfig::tls`]), as the TLS reloader
/// reads it (also the metrics port's).
pub struct TlsListenerConfig {
    pub bind: SocketAddr,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates are verified against.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate signed by `client_ca`.
    #[serde(default)]
    pub require_client_cert: bool,
    /// Use the client certificate's Common Name as the username (authenticated by the
    /// certificate; the ACL applies to it).
    #[serde(default)]
    pub use_identity_as_username: bool,
    /// Certificate revocation lists (PEM) checked against client certificates; re-read with
    /// the certificates.
    #[serde(default)]
    pub crl_file: Option<PathBuf>,
}

/// Without a `[metrics]` table the built-in default applies (127.0.0.1:9883); a `[metrics]`
/// table without `bind` turns the endpoint off.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus text exposition on `/metrics`. 9090 is Prometheus' own port, hence 9883.
    #[serde(default)]
    pub bind: Option<SocketAddr>,
    /// With `key`: the port speaks HTTPS (certificate chain, PEM), so admin tokens never
    /// cross a network in clear. Re-read like the MQTT TLS listener's files.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl MetricsConfig {
    /// The port's TLS settings in the TLS listener's terms, when it has a certificate.
    pub fn tls(&self) -> Option<TlsListenerConfig> {
        match (&self.bind, &self.cert, &self.key) {
            (Some(bind), Some(cert), Some(key)) => Some(TlsListenerConfig {
                bind: *bind,
                cert: cert.clone(),
                key: key.clone(),
                client_ca: None,
                require_client_cert: false,
                use_identity_as_username: false,
                crl_file: None,
            }),
            _ => None,
        }
    }
}

/// `[admin]`: who may use the admin API. Without `token_file` the API is off (its routes
/// answer 404) and the read-only status page is all there is.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer tokens, one `name:token` per line (`#` comments); re-read on SIGHUP. The name
    /// is what the audit log records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Serve the API on a plain (no `cert`) metrics port bound beyond loopback. Off, the
    /// broker refuses to start so: tokens would cross the network in clear.
    pub allow_insecure_remote: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory for durable state (relative paths resolve against the working directory).
    pub dir: PathBuf,
    /// What an acknowledgement promises: `"os"` (written to the OS before the ack: survives a
    /// broker crash), `"fsync"` (synced to disk: survives power loss), `"memory"` (nothing
    /// written: lost on restart).
    pub durability: Durability,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    Memory,
    Os,
    Fsync,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest packet (whole packet, fixed header included) accepted from a client, in bytes.
    pub max_packet_size: u32,
    /// Inbound QoS 1/2 publishes a v5 client may have unacknowledged (advertised in CONNACK).
    pub receive_maximum: u16,
    /// Outbound QoS 1/2 window per session; also capped by the client's Receive Maximum.
    pub max_inflight: u16,
    /// Messages queued per session (online backlog or offline queue) before new ones are dropped.
    pub max_queued_messages: usize,
    /// Bytes (payload plus topic of each message) queued per session before new ones are dropped.
    pub max_queued_bytes: usize,
    /// Messages queued per persistent session (one that outlives its connection) before new
    /// ones are dropped. Larger than `max_queued_messages`: beyond a memory share such a
    /// queue lives on disk, so a consumer slower than its publishers, or away, does not lose
    /// what they sent. Without a durable store, `max_queued_messages` applies instead.
    pub max_queued_messages_persistent: usize,
    /// Bytes queued per persistent session, as `max_queued_messages_persistent`.
    pub max_queued_bytes_persistent: usize,
    /// Largest keep alive a client may use (whole seconds, at most 65535); v5 clients are told
    /// via Server Keep Alive. 0 means no limit. In CONNACK's terms: [`Self::max_keepalive_secs`].
    #[serde(with = "duration::seconds")]
    pub max_keepalive: Duration,
    /// Concurrent client connections; further connections are closed at accept.
    pub max_connections: usize,
    /// Cap on a session's expiry interval (whole seconds, at most u32::MAX = never expires; v5
    /// clients are told in CONNACK). In CONNACK's terms: [`Self::max_session_expiry_secs`].
    #[serde(with = "duration::seconds")]
    pub max_session_expiry: Duration,
    /// Retained messages kept broker-wide; new topics beyond this are not retained.
    pub max_retained_messages: usize,
    /// Inbound QoS 2 packet ids awaiting PUBREL per client (3.1.1 clients have no Receive Maximum).
    pub max_inbound_qos2: usize,
    /// Time a new socket may take to send CONNECT; at least 1 s.
    #[serde(with = "duration::seconds")]
    pub connect_timeout: Duration,
    /// Time a peer may leave written data unread before it is disconnected; at least 1 s.
    #[serde(with = "duration::seconds")]
    pub write_timeout: Duration,
    /// New connections accepted per second per listener (token bucket, burst of one second's
    /// worth); connections over the rate are closed at accept. 0 means no limit.
    pub max_connect_rate: u32,
    /// Longest PUBLISH topic name or SUBSCRIBE topic filter, in bytes.
    pub max_topic_length: usize,
    /// Most levels (`/`-separated parts) in a topic name or topic filter.
    pub max_topic_levels: usize,
    /// Subscriptions (distinct topic filters) per client. 0 means no limit.
    pub max_subscriptions: usize,
    /// PUBLISH packets per second a client may send; beyond it the broker stops reading that
    /// client's socket until the budget refills (back-pressure, never a disconnect). 0 = no limit.
    pub max_publish_rate: u32,
    /// PUBLISH bytes (whole packets) per second a client may send, enforced like
    /// `max_publish_rate`. 0 = no limit.
    pub max_publish_bytes_rate: u32,
    /// Slow publishers down (stop reading their sockets) while a connected subscriber's queue
    /// they publish to is 3/4 full, until it is below 1/2. Off by default: with it, one slow
    /// subscriber slows every publisher it listens to.
    pub backpressure: bool,
}

/// Shared subscriptions (`$share/{ShareName}/{filter}`): how a group picks the member that
/// gets a message, and the group's own queue.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SharedConfig {
    /// Strategy of groups not listed in `groups`.
    pub strategy: Strategy,
    /// Per-group strategies: `groups = [{ name = "orders", strategy = "hash_clientid" }]`.
    pub groups: Vec<GroupStrategy>,
    /// Messages a group holds for its members (waiting for in-flight credit, or for a member
    /// to come back) before new ones are dropped.
    pub max_queued_messages: usize,
    /// Bytes (payload plus topic) a group holds before new messages are dropped.
    pub max_queued_bytes: usize,
    /// Slow publishers down (stop reading their sockets) while a group they publish to is 3/4
    /// full and has a connected member, until it is below 1/2.
    pub backpressure: bool,
}

/// How a shared subscription group picks a member.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Members in turn, skipping those without free in-flight credit.
    #[default]
    RoundRobin,
    /// A random member with free credit.
    Random,
    /// The member chosen by the publishing session: one publisher's messages stay in order on
    /// one member while the membership does not change.
    HashClientid,
    /// The member chosen by the topic: one topic's messages stay in order on one member.
    HashTopic,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupStrategy {
    /// The ShareName.
    pub name: String,
    pub strategy: Strategy,
}

/// A declared queue's (or bridge's) name: what follows `$queue/` ([`QueueConfig::name`]).
pub fn queue_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl SharedConfig {
    /// The strategy of the group named `name`.
    pub fn strategy_of(&self, name: &str) -> Strategy {
        self.groups
            .iter()
            .find(|g| g.name == name)
            .map_or(self.strategy, |g| g.strategy)
    }
}

impl Default for SharedConfig {
    fn default() -> Self {
        SharedConfig {
            strategy: Strategy::RoundRobin,
            groups: Vec::new(),
            max_queued_messages: 100_000,
            max_queued_bytes: 64 * 1024 * 1024,
            backpressure: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Highest QoS granted (0, 1 or 2); advertised as Maximum QoS to v5 clients.
    pub max_qos: u8,
    /// Whether retained messages are supported (Retain Available).
    pub retain_available: bool,
    /// Topic aliases a v5 client may use towards the broker (Topic Alias Maximum in CONNACK).
    pub topic_alias_maximum: u16,
    /// Topic prefix handed to v5 clients that ask for Response Information: a client gets
    /// `<prefix>/<client id>` and only it may subscribe below that. Empty disables it.
    pub response_prefix: String,
    /// Whether only a client may subscribe below its own Response Information topic
    /// (`<prefix>/<client id>`). Off by default: the prefix is handed out all the same, and a
    /// `#` archiver or a Mosquitto-style tool subscribing there is not refused.
    pub reserve_response_topics: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accept clients that present no username. Safe only on a listener nobody else can reach.
    pub allow_anonymous: bool,
    /// Mosquitto-format password file (`user:$7$...`); `tern passwd FILE USER` edits it.
    pub password_file: Option<PathBuf>,
    /// Mosquitto-format ACL file (`user`, `topic`, `pattern` with %u / %c). When set,
    /// everything it does not grant is denied.
    pub acl_file: Option<PathBuf>,
    /// The JWT backend (`[auth.jwt]`); listeners name it `"jwt"` in their chain.
    pub jwt: Option<JwtConfig>,
    /// The HTTP backend (`[auth.http]`); listeners name it `"http"` in their chain.
    pub http: Option<HttpAuthConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter directive, e.g. `info` or `tern=debug`.
    pub level: String,
    /// `text` (human-readable lines) or `json` (one JSON object per line, for log shippers).
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            bind: Some(SocketAddr::from(([127, 0, 0, 1], 9883))),
            cert: None,
            key: None,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            dir: PathBuf::from("data"),
            durability: Durability::Os,
        }
    }
}

impl Limits {
    /// `max_topic_length` (bytes) and `max_topic_levels` for a topic name or filter: the one
    /// place both limits are applied (PUBLISH, SUBSCRIBE, the will at CONNECT).
    pub fn topic_within(&self, topic: &str) -> bool {
        topic.len() <= self.max_topic_length
            && topic.bytes().filter(|&b| b == b'/').count() < self.max_topic_levels
    }

    /// `max_keepalive` as Server Keep Alive carries it: seconds in a u16 (validation keeps it
    /// a whole number within range).
    pub fn max_keepalive_secs(&self) -> u16 {
        u16::try_from(self.max_keepalive.as_secs()).unwrap_or(u16::MAX)
    }

    /// `max_session_expiry` as Session Expiry Interval carries it: seconds in a u32
    /// (`u32::MAX`: never; validation keeps it a whole number within range).
    pub fn max_session_expiry_secs(&self) -> u32 {
        u32::try_from(self.max_session_expiry.as_secs()).unwrap_or(u32::MAX)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_size: 1024 * 1024,
            receive_maximum: 1024,
            max_inflight: 1024,
            max_queued_messages: 1000,
            max_queued_bytes: 16 * 1024 * 1024,
            max_queued_messages_persistent: 100_000,
            max_queued_bytes_persistent: 1024 * 1024 * 1024,
            max_keepalive: Duration::ZERO,
            max_connections: 10_000,
            max_session_expiry: Duration::from_secs(u64::from(u32::MAX)),
            max_retained_messages: 100_000,
            max_inbound_qos2: 1024,
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_connect_rate: 0,
            max_topic_length: 65535,
            max_topic_levels: 128,
            max_subscriptions: 0,
            max_publish_rate: 0,
            max_publish_bytes_rate: 0,
            backpressure: false,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            max_qos: 2,
            retain_available: true,
            topic_alias_maximum: 64,
            response_prefix: "reply".to_string(),
            reserve_response_topics: false,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
        }
    }
}

impl Config {
    /// Loads defaults, then `file` (if any), then `TERN__*` environment variables, and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with(file, None)
    }

    /// [`Self::load`] with the environment variables `vars` instead of the process's when given
    /// (tests: the process environment is shared by every test thread).
    fn load_with(
        file: Option<&Path>,
        vars: Option<config::Map<String, String>>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("TERN")
                .prefix_separator("__")
                .separator("__")
                .source(vars)
                .try_parsing(true),
        );
        let built = builder.build().map_err(ConfigError::from_loader)?;
        let cfg: Config = built.try_deserialize().map_err(ConfigError::from_loader)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a TOML document on top of the built-in defaults (no environment); used by tests.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(ConfigError::from_loader)?;
        let cfg: Config = built.try_deserialize().map_err(ConfigError::from_loader)?;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Docs drift: every key the built-in configuration has is documented in
    /// `[cluster]` has no built-in default (absent means a single node), so the walk over
    /// the defaults below does not see it: every one of its keys has a row all the same, and
    /// the defaults the rows show are the ones serde applies.
    #[test]
    fn every_cluster_key_is_documented() {
        let doc = include_str!("../../docs/configuration.md");
        let start = doc.find("### `[cluster]`").expect("[cluster] heading");
        let rest = &doc[start + 5..];
        let section = &rest[..rest.find("\n#").unwrap_or(rest.len())];
        let c = Config::from_toml("[cluster]\nnode = \"a\"\nnats = [\"nats://127.0.0.1:4222\"]\n")
            .unwrap()
            .cluster
            .unwrap();
        let value = toml::Value::try_from(&c).unwrap();
        let table = value.as_table().unwrap();
        assert!(table.len() >= 10, "{table:?}");
        for (key, v) in table {
            let row = section
                .lines()
                .find(|l| l.starts_with(&format!("| `{key}`")))
                .unwrap_or_else(|| panic!("cluster.{key}: no row"));
            let shown = match (key.as_str(), v) {
                ("node" | "nats", _) => "(required)".to_string(),
                (_, toml::Value::String(s)) => format!("\"{s}\""),
                (_, other) => other.to_string(),
            };
            assert!(
                row.contains(&format!("`{shown}`"))
                    || shown == "(required)" && row.contains(&shown),
                "cluster.{key}: default {shown} not in {row}"
            );
        }
    }

    /// A consumer cannot have more replicas than its stream; at least one.
    #[test]
    fn consumer_replicas_stay_within_the_streams() {
        let t = |extra: &str| {
            Config::from_toml(&format!(
                "[cluster]\nnode = \"a\"\nnats = [\"nats://127.0.0.1:4222\"]\n{extra}"
            ))
        };
        assert_eq!(t("").unwrap().cluster.unwrap().consumer_replicas, 1);
        assert!(t("replicas = 3\nconsumer_replicas = 3\n").is_ok());
        for bad in [
            "consumer_replicas = 0",
            "replicas = 1\nconsumer_replicas = 3",
        ] {
            let e = t(bad).unwrap_err().to_string();
            assert!(e.contains("cluster.consumer_replicas"), "{bad}: {e}");
        }
    }

    /// docs/configuration.md, in the table under its section's heading, with its default.
    #[test]
    fn every_key_is_documented_with_its_default() {
        let doc = include_str!("../../docs/configuration.md");
        let value = toml::Value::try_from(Config::default()).expect("serialise defaults");
        let mut missing = Vec::new();
        let mut checked = 0;
        fn walk(
            path: &str,
            v: &toml::Value,
            doc: &str,
            missing: &mut Vec<String>,
            checked: &mut usize,
        ) {
            let Some(table) = v.as_table() else { return };
            for (key, v) in table {
                let full = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if v.is_table() {
                    walk(&full, v, doc, missing, checked);
                    continue;
                }
                *checked += 1;
                // The section's part of the document: from its heading to the next heading.
                // Listeners are documented once, under `[listeners.NAME]`.
                let section_path = match path.strip_prefix("listeners.") {
                    Some(rest) => match rest.split_once('.') {
                        Some((_, sub)) => format!("listeners.NAME.{sub}"),
                        None => "listeners.NAME".to_string(),
                    },
                    None => path.to_string(),
                };
                let heading = format!("### `[{section_path}]`");
                let Some(start) = doc.find(&heading) else {
                    missing.push(format!("{full}: no heading {heading}"));
                    continue;
                };
                let rest = &doc[start + heading.len()..];
                let section = &rest[..rest.find("\n#").unwrap_or(rest.len())];
                let Some(row) = section
                    .lines()
                    .find(|l| l.starts_with(&format!("| `{key}`")))
                else {
                    missing.push(format!("{full}: no row"));
                    continue;
                };
                let shown = match v {
                    toml::Value::String(s) if s.is_empty() => {
                        vec!["none".to_string(), "`\"\"`".into()]
                    }
                    toml::Value::String(s) => vec![format!("`\"{s}\"`"), format!("`{s}`")],
                    toml::Value::Array(a) if a.is_empty() => vec!["`[]`".to_string()],
                    toml::Value::Array(_) => continue,
                    other => vec![format!("`{other}`")],
                };
                if !shown.iter().any(|s| row.contains(s.as_str())) {
                    missing.push(format!("{full}: default {v} not in its row"));
                }
            }
        }
        walk("", &value, doc, &mut missing, &mut checked);
        assert!(
            missing.is_empty(),
            "docs/configuration.md drifted:\n{}",
            missing.join("\n")
        );
        // Not vacuous: the built-in configuration has 36 keys outside the optional tables
        // (`[listeners.tls]`, `[listeners.ws]`, `[listeners.wss]`, which it does not walk).
        assert!(checked >= 36, "only {checked} keys checked");
    }

    #[test]
    fn default_toml_lists_every_builtin_default_except_dev_overrides() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
                .expect("config/default.toml is readable");
        let file = Config::from_toml(&text).expect("config/default.toml is valid");
        let mut expected = Config::default();
        // The development config deliberately differs from the built-in defaults here only.
        expected.auth.allow_anonymous = true;
        // And it declares the queue examples/durable_queue.py uses.
        expected.queues = vec![QueueConfig {
            name: "examples".into(),
            filter: "examples/queue/#".into(),
            max_messages: 10_000,
            max_bytes: QueueConfig::default_max_bytes(),
            message_ttl: Duration::from_secs(86_400),
            strategy: Strategy::RoundRobin,
            overflow: Overflow::DropOldest,
        }];
        assert_eq!(file, expected);

        // And every key is spelled out in the file, not inherited silently: parse the file
        // alone (no defaults layer) and it must still deserialize completely.
        let raw: toml::Value = toml::from_str(&text).expect("toml");
        for section in [
            "listeners",
            "metrics",
            "storage",
            "limits",
            "mqtt",
            "auth",
            "log",
            "shared",
            "sys_topics",
            "server",
        ] {
            assert!(raw.get(section).is_some(), "section [{section}] missing");
        }
        let limits = raw
            .get("limits")
            .and_then(|v| v.as_table())
            .expect("limits");
        for key in [
            "max_packet_size",
            "receive_maximum",
            "max_inflight",
            "max_queued_messages",
            "max_queued_bytes",
            "max_queued_messages_persistent",
            "max_queued_bytes_persistent",
            "max_keepalive",
            "max_connections",
            "max_session_expiry",
            "max_retained_messages",
            "max_inbound_qos2",
            "connect_timeout",
            "write_timeout",
            "max_connect_rate",
            "max_topic_length",
            "max_topic_levels",
            "max_subscriptions",
            "max_publish_rate",
            "max_publish_bytes_rate",
            "backpressure",
        ] {
            assert!(limits.contains_key(key), "limits.{key} missing");
        }
        let shared = raw
            .get("shared")
            .and_then(|v| v.as_table())
            .expect("shared");
        for key in [
            "strategy",
            "groups",
            "max_queued_messages",
            "max_queued_bytes",
            "backpressure",
        ] {
            assert!(shared.contains_key(key), "shared.{key} missing");
        }
    }

    /// The configurations shipped for systemd and Docker, and the override example of
    /// docs/configuration.md, are valid (they show durations with units).
    #[test]
    fn shipped_configs_and_the_docs_example_are_valid() {
        for path in ["config/systemd/tern.toml", "config/docker/tern.toml"] {
            let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
                .expect(path);
            if let Err(e) = Config::from_toml(&text) {
                panic!("{path}: {e}");
            }
        }
        let doc = include_str!("../../docs/configuration.md");
        let example = doc
            .split("## Example: an override file")
            .nth(1)
            .and_then(|rest| rest.split("```toml\n").nth(1))
            .and_then(|rest| rest.split("```").next())
            .expect("the override example");
        let c = Config::from_toml(example).expect("the override example is valid");
        assert_eq!(c.limits.max_keepalive, Duration::from_secs(300));
        assert_eq!(c.limits.max_session_expiry, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::from_toml("[limits]\nmax_queued_mesages = 5\n").unwrap_err();
        assert!(err.to_string().contains("max_queued_mesages"), "{err}");
    }

    #[test]
    fn listeners_and_metrics_are_on_only_when_present() {
        let c = Config::from_toml("[limits]\nmax_inflight = 5\n").unwrap();
        assert!(
            c.listeners.get("tcp").is_some(),
            "built-in default without [listeners]"
        );
        assert!(c.metrics.bind.is_some());
        let c = Config::from_toml("[listeners.tcp]\nbind = \"127.0.0.1:0\"\n[metrics]\n").unwrap();
        assert_eq!(c.listeners.get("tcp").unwrap().bind.port(), 0);
        assert_eq!(c.listeners.0.len(), 1);
        assert_eq!(c.metrics.bind, None, "[metrics] without bind turns it off");
    }

    #[test]
    fn shared_strategies_parse_per_group() {
        let c = Config::from_toml(
            "[shared]\nstrategy = \"random\"\ngroups = [{ name = \"Orders\", strategy = \"hash_clientid\" }, { name = \"t\", strategy = \"hash_topic\" }]\n",
        )
        .unwrap();
        assert_eq!(c.shared.strategy_of("Orders"), Strategy::HashClientid);
        assert_eq!(c.shared.strategy_of("t"), Strategy::HashTopic);
        assert_eq!(c.shared.strategy_of("other"), Strategy::Random);
        let err = Config::from_toml("[shared]\nstrategy = \"fastest\"\n").unwrap_err();
        assert!(err.to_string().contains("fastest"), "{err}");
        let err =
            Config::from_toml("[shared]\ngroups = [{ name = \"a/b\", strategy = \"random\" }]\n")
                .unwrap_err();
        assert!(err.to_string().contains("shared.groups"), "{err}");
    }

    #[test]
    fn threads_zero_leaves_a_cpu_for_the_store_and_the_kernel() {
        assert_eq!(auto_threads(1), 1);
        assert_eq!(auto_threads(2), 1);
        assert_eq!(auto_threads(16), 15);
        let c = Config::from_toml("[server]\nthreads = 3\n").unwrap();
        assert_eq!(c.server.threads(), 3);
        assert!(Config::default().server.threads() >= 1);
    }

    /// Every time key, by its full path, and how to set it in a test.
    const TIME_KEYS: [(&str, &str); 5] = [
        ("limits", "max_keepalive"),
        ("limits", "max_session_expiry"),
        ("limits", "connect_timeout"),
        ("limits", "write_timeout"),
        ("sys_topics", "interval"),
    ];

    fn time_keys(c: &Config) -> [Duration; 5] {
        [
            c.limits.max_keepalive,
            c.limits.max_session_expiry,
            c.limits.connect_timeout,
            c.limits.write_timeout,
            c.sys_topics.interval,
        ]
    }

    /// A file in the temporary directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let path = std::env::temp_dir().join(format!("tern-{}-{name}", std::process::id()));
            std::fs::write(&path, text).expect("write temporary file");
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn env(vars: &[(&str, &str)]) -> Option<config::Map<String, String>> {
        Some(
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// Both forms of every time key, from a file and from `TERN__` variables (whose values
    /// arrive as strings: "30" is 30 seconds), as `tern` loads them.
    #[test]
    fn time_keys_take_integers_and_units_from_file_and_environment() {
        let secs = Duration::from_secs;
        for (i, (integers, units)) in [
            ("60", "\"1m\""),
            ("86400", "\"1d\""),
            ("2", "\"2000ms\""),
            ("7200", "\"2h\""),
            ("30", "\"30 s\""),
        ]
        .into_iter()
        .enumerate()
        {
            let want = [secs(60), secs(86_400), secs(2), secs(7200), secs(30)][i];
            let (section, key) = TIME_KEYS[i];
            for value in [integers, units] {
                let file = TempFile::new(
                    &format!("{section}-{key}.toml"),
                    &format!("[{section}]\n{key} = {value}\n"),
                );
                let c = Config::load_with(Some(&file.0), env(&[])).expect(value);
                assert_eq!(time_keys(&c)[i], want, "file: {section}.{key} = {value}");
                let var = format!("TERN__{section}__{key}").to_uppercase();
                let c =
                    Config::load_with(None, env(&[(&var, value.trim_matches('"'))])).expect(value);
                assert_eq!(time_keys(&c)[i], want, "env: {var}={value}");
            }
        }

        // The environment overrides the file, whichever form either uses.
        let file = TempFile::new(
            "override.toml",
            "[limits]\nconnect_timeout = 5\nwrite_timeout = \"2m\"\n",
        );
        let c = Config::load_with(
            Some(&file.0),
            env(&[
                ("TERN__LIMITS__CONNECT_TIMEOUT", "1500ms"),
                ("TERN__LIMITS__WRITE_TIMEOUT", "45"),
            ]),
        )
        .expect("override");
        assert_eq!(c.limits.connect_timeout, Duration::from_millis(1500));
        assert_eq!(c.limits.write_timeout, secs(45));
    }

    #[test]
    fn a_bad_duration_is_an_error_naming_the_key() {
        let expected = |key: &str| {
            format!(
                "configuration key `{key}`: invalid duration \"3 parsecs\": expected an integer number of seconds or a number with a unit ms, s, m, h, d"
            )
        };
        for (section, key) in TIME_KEYS {
            let full = format!("{section}.{key}");
            let err =
                Config::from_toml(&format!("[{section}]\n{key} = \"3 parsecs\"\n")).unwrap_err();
            assert_eq!(err.to_string(), expected(&full));
            let file = TempFile::new(
                &format!("bad-{section}-{key}.toml"),
                &format!("[{section}]\n{key} = \"3 parsecs\"\n"),
            );
            let err = Config::load_with(Some(&file.0), env(&[])).unwrap_err();
            assert!(err.to_string().starts_with(&expected(&full)), "{err}");
            let var = format!("TERN__{section}__{key}").to_uppercase();
            let err = Config::load_with(None, env(&[(&var, "3 parsecs")])).unwrap_err();
            assert!(err.to_string().starts_with(&expected(&full)), "{err}");
        }
        for (text, shown) in [
            ("[limits]\nwrite_timeout = -1\n", "invalid duration -1:"),
            ("[limits]\nwrite_timeout = 2.5\n", "invalid duration 2.5:"),
            (
                "[limits]\nwrite_timeout = \"99999999999999999999d\"\n",
                "invalid duration \"99999999999999999999d\": too large",
            ),
        ] {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(
                err.starts_with("configuration key `limits.write_timeout`: ")
                    && err.contains(shown),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn builtin_defaults_refuse_anonymous() {
        assert!(!Config::default().auth.allow_anonymous);
    }
}
