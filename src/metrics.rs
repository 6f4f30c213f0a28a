//! Prometheus metrics: the counters the core bumps, and their text exposition.
//!
//! Labelled children are resolved once here so the hot path only bumps an atomic. Gauges that
//! describe broker state (sessions, subscriptions, retained) are set at scrape time from a
//! [`BrokerState`] the HTTP side reads from the broker (this module sits below the broker and
//! does not know it; `http.rs` serves `/metrics`).

use crate::protocol::kind;
use crate::session::registry::SessionStats;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::atomic::Ordering;
use std::time::Duration;

pub struct Metrics {
    registry: Registry,
    /// MQTT connections open now (CONNACK sent, not yet closed): `tern_connections_open`.
    pub connections: IntGauge,
    pub connections_total: IntCounter,
    /// Connections closed, by [`CloseReason`], resolved once (indexed by the reason).
    closed: [IntCounter; CloseReason::ALL.len()],
    /// Sockets open per listener, from accept to close (handshakes and CONNECT included).
    listener_sockets: IntGaugeVec,
    /// A TLS listener's certificate's notAfter, by listener (`tls`, `wss`).
    tls_not_after: IntGaugeVec,
    /// Connections refused, by listener and reason (a few fixed reasons per listener).
    listener_refusals: IntCounterVec,
    /// Failed JWKS fetches (brought up to the JWT backend's count at scrape).
    jwks_failures: IntCounter,
    /// Configuration reloads, by result, resolved once.
    reload_ok: IntCounter,
    reload_failed: IntCounter,
    reload_last_success: IntGauge,
    reload_last_successful: IntGauge,
    /// The configured bounds of declared queues and bridges' queues (config, set at start and
    /// on reload), so that an alert can compare a queue with its bound.
    queue_bounds: IntGaugeVec,
    bridge_bounds: IntGaugeVec,
    pub refused_max_connections: IntCounter,
    pub refused_connect_rate: IntCounter,
    pub refused_protocol: IntCounter,
    pub refused_auth: IntCounter,
    /// CONNECTs refused because the authentication chain could not decide (the HTTP service
    /// did not answer, the JWKS cannot be fetched): CONNACK 0x88, a failure of the broker's
    /// side, so apart from `not_authorized`, which counts refused credentials.
    pub refused_auth_unavailable: IntCounter,
    pub received: [IntCounter; 3],
    pub sent: [IntCounter; 3],
    pub bytes_received: IntCounter,
    pub bytes_sent: IntCounter,
    pub dropped_queue_full: IntCounter,
    pub dropped_expired: IntCounter,
    pub dropped_too_large: IntCounter,
    pub dropped_not_authorized: IntCounter,
    pub dropped_no_subscribers: IntCounter,
    pub dropped_retain_full: IntCounter,
    /// Deliveries whose commit failed (I/O error, disk full): their places were released.
    pub dropped_storage_failed: IntCounter,
    /// Oldest messages a full declared queue dropped to make room (`overflow = "drop_oldest"`).
    pub dropped_overflow: IntCounter,
    /// Queued messages an operator purged through the admin API.
    pub dropped_purged: IntCounter,
    pub protocol_errors: IntCounter,
    pub tls_handshakes: IntCounter,
    pub tls_failures: IntCounter,
    pub ws_handshakes: IntCounter,
    pub ws_failures: IntCounter,
    /// CONNECTs refused by authentication (bad user name or password, anonymous not allowed,
    /// no certificate identity); also in `tern_connections_refused_total{reason="not_authorized"}`.
    pub auth_failures: IntCounter,
    /// The HTTP authentication backend's checks and request times (`auth::http::HttpAuth`).
    pub auth_http: crate::auth::http::HttpAuthMetrics,
    /// Control packets from clients, by type.
    pub packets_received: PacketCounters,
    /// Control packets to clients, by type.
    pub packets_sent: PacketCounters,
    pub storage: StorageMetrics,
    /// The cluster's traffic and health (zero on a single node).
    pub cluster: ClusterMetrics,
    /// Publishers paused because a queue they publish to passed the back-pressure threshold.
    pub backpressure_pauses: IntCounter,
    sessions: IntGaugeVec,
    subscriptions: IntGauge,
    retained: IntGauge,
    queued: IntGauge,
    queued_bytes: IntGauge,
    inflight: IntGauge,
    /// Places reserved in persistent queues whose commit has not settled yet.
    reservations_open: IntGauge,
    queue_depth: Vec<IntGauge>,
    uptime: IntGauge,
    started: std::time::Instant,
    /// Most connections open at once since the start (`$SYS/broker/clients/maximum`).
    connections_max: std::sync::atomic::AtomicI64,
    shared: SharedVecs,
    queues: QueueVecs,
    lag: LagVecs,
    bridges: BridgeVecs,
}

/// What crosses between this node and the others of its cluster (src/cluster/).
pub struct ClusterMetrics {
    /// Messages handed to NATS: core NATS (QoS 0) and the messages stream (QoS 1/2).
    pub out_live: IntCounter,
    pub out_stream: IntCounter,
    /// JetStream messages this node put in the messages stream: a batch of one topic's
    /// QoS 1/2 messages is one (`cluster/wire.rs`); `out_stream` ÷ this is the batch size.
    pub stream_publishes: IntCounter,
    /// Messages from other nodes routed here, by the same two paths.
    pub in_live: IntCounter,
    pub in_stream: IntCounter,
    /// QoS 1 batches' copies over core NATS for clean sessions (`cluster/fast.rs`): sent,
    /// and routed here (a copy that came after its stream copy is not counted).
    pub out_fast: IntCounter,
    pub in_fast: IntCounter,
    /// QoS 1/2 publishes JetStream did not store within `cluster.quorum_timeout`: refused,
    /// never acknowledged.
    pub refused: IntCounter,
    /// QoS 0 messages not forwarded because the queue to NATS was full.
    pub dropped_live: IntCounter,
    /// Connections here taken over by a connection with the same client id on another node.
    pub taken_over: IntCounter,
    /// 1 while this node's heartbeat reaches JetStream's quorum.
    pub available: IntGauge,
    /// Nodes with a live heartbeat.
    pub members: IntGauge,
    /// QoS 1 deliveries to persistent sessions made from a fast copy, before the message was
    /// stored (`broker/early.rs`).
    pub early: IntCounter,
    /// Times this node's consumer was made again because it stopped delivering (its NATS
    /// server down; `cluster/receive.rs`, `NodeConsumer`).
    pub consumer_remade: IntCounter,
}

impl ClusterMetrics {
    fn new(registry: &Registry) -> prometheus::Result<ClusterMetrics> {
        let messages = IntCounterVec::new(
            Opts::new(
                "tern_cluster_messages_total",
                "Messages between this node and the others, by direction and path (live: core NATS, QoS 0; stream: JetStream, QoS 1/2; fast: core NATS copies of QoS 1, for clean sessions and early deliveries)",
            ),
            &["direction", "path"],
        )?;
        registry.register(Box::new(messages.clone()))?;
        let stream_publishes = IntCounter::new(
            "tern_cluster_stream_publishes_total",
            "JetStream messages put in the cluster's messages stream; one carries a batch of one topic's QoS 1/2 messages, so messages_total{direction=\"out\",path=\"stream\"} divided by this is the mean batch size",
        )?;
        registry.register(Box::new(stream_publishes.clone()))?;
        let refused = IntCounter::new(
            "tern_cluster_publishes_refused_total",
            "QoS 1/2 publishes JetStream did not store with its replicas within cluster.quorum_timeout (refused, not acknowledged)",
        )?;
        registry.register(Box::new(refused.clone()))?;
        let dropped_live = IntCounter::new(
            "tern_cluster_live_messages_dropped_total",
            "QoS 0 messages not forwarded to the other nodes because the queue to NATS was full",
        )?;
        registry.register(Box::new(dropped_live.clone()))?;
        let taken_over = IntCounter::new(
            "tern_cluster_takeovers_total",
            "Connections closed because the same client id connected on another node",
        )?;
        registry.register(Box::new(taken_over.clone()))?;
        let available = IntGauge::new(
            "tern_cluster_available",
            "1 while this node's heartbeat reaches JetStream's quorum (durable promises possible), else 0",
        )?;
        registry.register(Box::new(available.clone()))?;
        let members = IntGauge::new(
            "tern_cluster_members",
            "Nodes of the cluster with a live heartbeat, this one included (0 on a single node)",
        )?;
        registry.register(Box::new(members.clone()))?;
        let early = IntCounter::new(
            "tern_cluster_early_deliveries_total",
            "QoS 1 deliveries to persistent sessions made from another node's fast copy, before the message was stored here (stored when its stream copy comes, unless acknowledged first)",
        )?;
        registry.register(Box::new(early.clone()))?;
        let consumer_remade = IntCounter::new(
            "tern_cluster_consumer_remakes_total",
            "Times this node's JetStream consumer was made again, reading on where the node was, because it stopped delivering (the NATS server holding it down)",
        )?;
        registry.register(Box::new(consumer_remade.clone()))?;
        Ok(ClusterMetrics {
            out_live: messages.with_label_values(&["out", "live"]),
            out_stream: messages.with_label_values(&["out", "stream"]),
            stream_publishes,
            out_fast: messages.with_label_values(&["out", "fast"]),
            in_fast: messages.with_label_values(&["in", "fast"]),
            in_live: messages.with_label_values(&["in", "live"]),
            in_stream: messages.with_label_values(&["in", "stream"]),
            refused,
            dropped_live,
            taken_over,
            available,
            members,
            early,
            consumer_remade,
        })
    }
}

/// Names of MQTT control packet types, indexed by the type nibble of the fixed header.
const PACKET_TYPES: [&str; 16] = [
    "",
    "connect",
    "connack",
    "publish",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "subscribe",
    "suback",
    "unsubscribe",
    "unsuback",
    "pingreq",
    "pingresp",
    "disconnect",
    "auth",
];

/// Packet types a client sends, and those the broker sends.
const FROM_CLIENT: [u8; 11] = [
    kind::CONNECT,
    kind::PUBLISH,
    kind::PUBACK,
    kind::PUBREC,
    kind::PUBREL,
    kind::PUBCOMP,
    kind::SUBSCRIBE,
    kind::UNSUBSCRIBE,
    kind::PINGREQ,
    kind::DISCONNECT,
    kind::AUTH,
];
const TO_CLIENT: [u8; 11] = [
    kind::CONNACK,
    kind::PUBLISH,
    kind::PUBACK,
    kind::PUBREC,
    kind::PUBREL,
    kind::PUBCOMP,
    kind::SUBACK,
    kind::UNSUBACK,
    kind::PINGRESP,
    kind::DISCONNECT,
    kind::AUTH,
];

/// One counter per packet type of one direction, resolved once; indexed by the type nibble.
pub struct PacketCounters([Option<IntCounter>; 16]);

impl PacketCounters {
    fn new(vec: &IntCounterVec, types: &[u8]) -> PacketCounters {
        let mut c: [Option<IntCounter>; 16] = Default::default();
        for &t in types {
            c[usize::from(t)] = Some(vec.with_label_values(&[PACKET_TYPES[usize::from(t)]]));
        }
        PacketCounters(c)
    }

    /// Packets of every type.
    pub fn total(&self) -> u64 {
        self.0.iter().flatten().map(|c| c.get()).sum()
    }

    /// Adds `n` packets of type `packet_type` (a [`kind`] constant).
    pub fn add(&self, packet_type: u8, n: u64) {
        if let Some(Some(c)) = self.0.get(usize::from(packet_type)) {
            c.inc_by(n);
        }
    }
}

/// Per shared subscription group series, labelled by ShareName and filter. Groups are made by
/// subscribers, but a deployment has a handful; a group's series go when the group ends.
struct SharedVecs {
    members: IntGaugeVec,
    queued: IntGaugeVec,
    delivered: IntCounterVec,
    redelivered: IntCounterVec,
    dropped: IntCounterVec,
}

/// Per declared queue series, labelled by the queue's name (`[[queues]]`, a handful per
/// deployment); a queue's series go when it ends. The oldest age is labelled by kind and name,
/// the one gauge every kind of durable queue (declared queues, later bridges) reports.
struct QueueVecs {
    messages: IntGaugeVec,
    consumers: IntGaugeVec,
    oldest: IntGaugeVec,
    delivered: IntCounterVec,
    redelivered: IntCounterVec,
    dropped: IntCounterVec,
}

impl QueueVecs {
    fn new(registry: &Registry) -> Result<QueueVecs, prometheus::Error> {
        let l = &["queue"];
        let v = QueueVecs {
            messages: IntGaugeVec::new(
                Opts::new(
                    "tern_queue_messages",
                    "Messages waiting in a declared queue (memory and disk), not yet given to a consumer",
                ),
                l,
            )?,
            consumers: IntGaugeVec::new(
                Opts::new(
                    "tern_queue_consumers",
                    "Sessions subscribed to a declared queue ($queue/NAME), connected or not",
                ),
                l,
            )?,
            oldest: IntGaugeVec::new(
                Opts::new(
                    "tern_queue_oldest_age_seconds",
                    "Age of the oldest message waiting in a durable queue (0 when empty), by kind (queue) and name",
                ),
                &["kind", "name"],
            )?,
            delivered: IntCounterVec::new(
                Opts::new(
                    "tern_queue_messages_delivered_total",
                    "Messages a declared queue gave to a consumer (redeliveries included)",
                ),
                l,
            )?,
            redelivered: IntCounterVec::new(
                Opts::new(
                    "tern_queue_messages_redelivered_total",
                    "Messages that went back to a declared queue because their consumer left before finishing them",
                ),
                l,
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "tern_queue_messages_dropped_total",
                    "Messages a declared queue lost, by reason: queue_full (refused when full), overflow (oldest dropped to make room), expired (message_ttl or Message Expiry)",
                ),
                &["queue", "reason"],
            )?,
        };
        registry.register(Box::new(v.messages.clone()))?;
        registry.register(Box::new(v.consumers.clone()))?;
        registry.register(Box::new(v.oldest.clone()))?;
        registry.register(Box::new(v.delivered.clone()))?;
        registry.register(Box::new(v.redelivered.clone()))?;
        registry.register(Box::new(v.dropped.clone()))?;
        Ok(v)
    }
}

// ---- Consumer lag (issue 18, part 3) ---------------------------------------------------
//
// How far behind consumers are: `tern_queue_oldest_age_seconds{kind,name}` (in `QueueVecs`,
// set at scrape time for every kind) and the publish-to-acknowledge latency histogram below.
// Both are labelled by kind (`shared`, `queue`, `bridge`) and name, so the label set is the
// groups and declared queues that exist: each group's series go when it ends. Sessions are
// never labels (a million clients would be a million series): the status page ranks them.

/// The kind and name a group's lag series carry; a `$share` group is named `SHARE/FILTER`
/// (the subscription without `$share/`), as one ShareName may serve several filters.
pub fn lag_labels(kind: &'static str, share: &str, filter: &str) -> (&'static str, String) {
    match kind {
        "shared" => (kind, format!("{share}/{filter}")),
        _ => (kind, share.to_string()),
    }
}

/// The latency histogram, by group.
struct LagVecs {
    latency: HistogramVec,
}

impl LagVecs {
    fn new(registry: &Registry) -> Result<LagVecs, prometheus::Error> {
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "tern_queue_delivery_latency_seconds",
                "Time from a message's arrival at this broker to its consumer's acknowledgement (PUBACK for QoS 1, PUBCOMP for QoS 2), by kind (shared, queue, bridge) and name; a message that waited on disk counts from its stored enqueue second",
            )
            // From a consumer keeping up (milliseconds) to one an hour behind.
            .buckets(vec![
                0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0,
            ]),
            &["kind", "name"],
        )?;
        registry.register(Box::new(latency.clone()))?;
        Ok(LagVecs { latency })
    }

    fn latency(&self, kind: &'static str, share: &str, filter: &str) -> Histogram {
        let (kind, name) = lag_labels(kind, share, filter);
        self.latency.with_label_values(&[kind, name.as_str()])
    }

    /// Drops an ended group's lag series.
    fn forget(&self, oldest: &IntGaugeVec, kind: &'static str, share: &str, filter: &str) {
        let (kind, name) = lag_labels(kind, share, filter);
        let _ = self.latency.remove_label_values(&[kind, name.as_str()]);
        let _ = oldest.remove_label_values(&[kind, name.as_str()]);
    }
}
// ---- end of consumer lag ----------------------------------------------------------------

/// Per bridge series, labelled by the bridge's name (`[[bridges]]`); they go when the bridge
/// and its queue end.
struct BridgeVecs {
    connected: IntGaugeVec,
    queued: IntGaugeVec,
    sent: IntCounterVec,
    resent: IntCounterVec,
    received: IntCounterVec,
    dropped: IntCounterVec,
    reconnects: IntCounterVec,
}

impl BridgeVecs {
    fn new(registry: &Registry) -> Result<BridgeVecs, prometheus::Error> {
        let l = &["bridge"];
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let v = BridgeVecs {
            connected: IntGaugeVec::new(
                Opts::new("tern_bridge_connected", "1 while the bridge's link to its remote broker is up"),
                l,
            )?,
            queued: IntGaugeVec::new(
                Opts::new(
                    "tern_bridge_queued_messages",
                    "Messages in the bridge's outgoing queue (memory and disk), not yet handed to the link",
                ),
                l,
            )?,
            sent: counter(
                "tern_bridge_messages_sent_total",
                "Messages the bridge handed to its link for the remote (re-sends after a reconnect included)",
                l,
            )?,
            resent: counter(
                "tern_bridge_messages_resent_total",
                "Messages sent again because the link went down before the remote acknowledged them: the possible duplicates, at most the in-flight window per reconnect",
                l,
            )?,
            received: counter(
                "tern_bridge_messages_received_total",
                "Messages the bridge took from the remote and published here",
                l,
            )?,
            dropped: counter(
                "tern_bridge_messages_dropped_total",
                "Messages a bridge did not pass on, by reason: queue_full (its outgoing queue was full), refused (the remote refused it for good), not_authorized (from the remote, refused by the ACL as bridge:NAME), echo (a 3.1.1 remote's copy of a message this bridge sent)",
                &["bridge", "reason"],
            )?,
            reconnects: counter(
                "tern_bridge_reconnects_total",
                "Times the bridge's link connected again after losing its remote (or failing to reach it)",
                l,
            )?,
        };
        registry.register(Box::new(v.connected.clone()))?;
        registry.register(Box::new(v.queued.clone()))?;
        registry.register(Box::new(v.sent.clone()))?;
        registry.register(Box::new(v.resent.clone()))?;
        registry.register(Box::new(v.received.clone()))?;
        registry.register(Box::new(v.dropped.clone()))?;
        registry.register(Box::new(v.reconnects.clone()))?;
        Ok(v)
    }
}

/// One bridge's counters, resolved once when it starts (`src/bridge`).
#[derive(Clone)]
pub struct BridgeMetrics {
    pub connected: IntGauge,
    pub received: IntCounter,
    pub reconnects: IntCounter,
    pub not_authorized: IntCounter,
    pub echoes: IntCounter,
    /// Refused by the remote for good (its PUBACK/PUBREC reason ≥ 0x80).
    pub refused: IntCounter,
}

/// Why a client connection ended, as `tern_connections_closed_total{reason}` counts it. A
/// fixed set, one label value per variant, so the series never grow with the clients; the
/// connection's own close reason (`connection/close.rs`) maps onto it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// The socket closed or failed without a DISCONNECT (network loss, client crash, reset).
    ConnectionLost,
    /// Nothing from the client within 1.5 times its keep alive.
    KeepAliveTimeout,
    /// A malformed packet or a protocol violation.
    ProtocolError,
    /// The client stopped reading (`limits.write_timeout`).
    WriteStalled,
    /// Another connection with the same client id took the session.
    TakenOver,
    /// An operator closed it (admin API kick).
    AdminKick,
    /// The broker is shutting down.
    ServerShutdown,
    /// The store could not keep what the client's acknowledgements depend on.
    StorageFailed,
    /// The credentials it connected with expired (a JWT's `exp`).
    CredentialsExpired,
}

impl CloseReason {
    /// Every reason, in declaration order (`reason as usize` indexes it).
    pub const ALL: [CloseReason; 10] = [
        CloseReason::ClientDisconnect,
        CloseReason::ConnectionLost,
        CloseReason::KeepAliveTimeout,
        CloseReason::ProtocolError,
        CloseReason::WriteStalled,
        CloseReason::TakenOver,
        CloseReason::AdminKick,
        CloseReason::ServerShutdown,
        CloseReason::StorageFailed,
        CloseReason::CredentialsExpired,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientDisconnect => "client_disconnect",
            CloseReason::ConnectionLost => "connection_lost",
            CloseReason::KeepAliveTimeout => "keepalive_timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::WriteStalled => "write_stalled",
            CloseReason::TakenOver => "taken_over",
            CloseReason::AdminKick => "admin_kick",
            CloseReason::ServerShutdown => "server_shutdown",
            CloseReason::StorageFailed => "storage_failed",
            CloseReason::CredentialsExpired => "credentials_expired",
        }
    }
}

/// How a configuration reload ended, for `tern_config_reloads_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    Success,
    Failure,
}

/// Seconds since the Unix epoch now (0 if the clock is before it).
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        // Not `tern_connections` next to `tern_connections_total`: Prometheus parsers take
        // `X` and `X_total` for one family (OpenMetrics counters drop the suffix).
        let connections = IntGauge::new(
            "tern_connections_open",
            "MQTT connections open now (CONNACK sent, not yet closed)",
        )?;
        let connections_total = IntCounter::new(
            "tern_connections_accepted_total",
            "MQTT connections accepted (CONNACK success)",
        )?;
        let closed_vec = IntCounterVec::new(
            Opts::new(
                "tern_connections_closed_total",
                "MQTT connections closed, by reason: client_disconnect, connection_lost (no DISCONNECT: network, crash, reset), keepalive_timeout, protocol_error, write_stalled (client stopped reading), taken_over (same client id connected again), admin_kick, server_shutdown, storage_failed",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(closed_vec.clone()))?;
        let closed = CloseReason::ALL.map(|r| closed_vec.with_label_values(&[r.label()]));
        let listener_sockets = IntGaugeVec::new(
            Opts::new(
                "tern_listener_connections_open",
                "Connections open on each MQTT listener (tcp, tls, ws, wss) from accept to close, TLS and WebSocket handshakes and the wait for CONNECT included; their sum is what limits.max_connections bounds",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(listener_sockets.clone()))?;
        let tls_not_after = IntGaugeVec::new(
            Opts::new(
                "tern_tls_certificate_expiry_timestamp_seconds",
                "The notAfter time (Unix seconds) of the certificate a TLS listener (tls, wss) presents, read again on every reload",
            ),
            &["listener"],
        )?;
        registry.register(Box::new(tls_not_after.clone()))?;
        let listener_refusals = IntCounterVec::new(
            Opts::new(
                "tern_listener_connections_refused_total",
                "Connections a listener refused, by listener and reason: connect_rate, max_connections, proxy_header (no valid PROXY protocol header), auth (CONNACK 0x86/0x87, 3.1.1 rc 4/5), protocol (any other CONNACK refusal)",
            ),
            &["listener", "reason"],
        )?;
        registry.register(Box::new(listener_refusals.clone()))?;
        let jwks_failures = IntCounter::new(
            "tern_auth_jwks_fetch_failures_total",
            "Failed fetches of the JWT backend's JWKS (auth.jwt.jwks_url): no answer within jwks_timeout, an error status, or no usable key; the last good keys stay valid for auth.jwt.jwks_max_stale",
        )?;
        registry.register(Box::new(jwks_failures.clone()))?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "tern_config_reloads_total",
                "Configuration reloads (SIGHUP), by result: success, or failure (the running configuration stayed)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(reloads.clone()))?;
        let reload_last_success = IntGauge::new(
            "tern_config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (Unix seconds; the start counts)",
        )?;
        reload_last_success.set(unix_now());
        registry.register(Box::new(reload_last_success.clone()))?;
        let reload_last_successful = IntGauge::new(
            "tern_config_last_reload_successful",
            "1 when the last configuration reload succeeded (or none was tried), 0 when it failed",
        )?;
        reload_last_successful.set(1);
        registry.register(Box::new(reload_last_successful.clone()))?;
        let queue_bounds = IntGaugeVec::new(
            Opts::new(
                "tern_queue_max_messages",
                "A declared queue's bound in messages ([[queues]] max_messages), to compare with tern_queue_messages",
            ),
            &["queue"],
        )?;
        registry.register(Box::new(queue_bounds.clone()))?;
        let bridge_bounds = IntGaugeVec::new(
            Opts::new(
                "tern_bridge_max_queued_messages",
                "A bridge's outgoing queue bound in messages ([[bridges]] max_queued_messages), to compare with tern_bridge_queued_messages",
            ),
            &["bridge"],
        )?;
        registry.register(Box::new(bridge_bounds.clone()))?;
        let refused = IntCounterVec::new(
            Opts::new(
                "tern_connections_refused_total",
                "Connections refused, by reason",
            ),
            &["reason"],
        )?;
        let received = IntCounterVec::new(
            Opts::new(
                "tern_messages_received_total",
                "PUBLISH packets received from clients, by QoS",
            ),
            &["qos"],
        )?;
        let sent = IntCounterVec::new(
            Opts::new(
                "tern_messages_sent_total",
                "PUBLISH packets sent to clients, by QoS",
            ),
            &["qos"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "tern_bytes_total",
                "Bytes on client connections, by direction",
            ),
            &["direction"],
        )?;
        let dropped = IntCounterVec::new(
            Opts::new(
                "tern_messages_dropped_total",
                "Messages not delivered to a subscriber (or to anyone), by reason",
            ),
            &["reason"],
        )?;
        let protocol_errors = IntCounter::new(
            "tern_protocol_errors_total",
            "Connections closed for malformed packets or protocol violations",
        )?;
        let tls = IntCounterVec::new(
            Opts::new("tern_tls_handshakes_total", "TLS handshakes, by result"),
            &["result"],
        )?;
        registry.register(Box::new(tls.clone()))?;
        let ws = IntCounterVec::new(
            Opts::new(
                "tern_websocket_handshakes_total",
                "WebSocket upgrades, by result (failed: refused path, subprotocol or origin, bad request, timeout)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(ws.clone()))?;
        let auth_failures = IntCounter::new(
            "tern_auth_failures_total",
            "CONNECTs refused by authentication (bad user name or password, anonymous not allowed, no certificate identity)",
        )?;
        registry.register(Box::new(auth_failures.clone()))?;
        let auth_http_requests = IntCounterVec::new(
            Opts::new(
                "tern_auth_http_checks_total",
                "Checks by the HTTP authentication backend, by kind (connect, acl) and outcome: allow (2xx), deny (4xx), timeout, error (unreachable, or another status), busy (no request slot within the timeout), cached_allow, cached_deny; all but the allows refuse",
            ),
            &["kind", "outcome"],
        )?;
        registry.register(Box::new(auth_http_requests.clone()))?;
        let auth_http_latency = HistogramVec::new(
            HistogramOpts::new(
                "tern_auth_http_request_duration_seconds",
                "Time from sending a request to the HTTP authentication service to its answer (or the timeout), by kind (connect, acl)",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["kind"],
        )?;
        registry.register(Box::new(auth_http_latency.clone()))?;
        let auth_http =
            crate::auth::http::HttpAuthMetrics::new(&auth_http_requests, &auth_http_latency)?;
        let packets_in = IntCounterVec::new(
            Opts::new(
                "tern_packets_received_total",
                "MQTT control packets received from clients, by type",
            ),
            &["type"],
        )?;
        let packets_out = IntCounterVec::new(
            Opts::new(
                "tern_packets_sent_total",
                "MQTT control packets sent to clients, by type",
            ),
            &["type"],
        )?;
        registry.register(Box::new(packets_in.clone()))?;
        registry.register(Box::new(packets_out.clone()))?;
        let queued = IntGauge::new(
            "tern_queued_messages",
            "Messages waiting in session queues (online and offline, memory and disk), not yet sent",
        )?;
        let queued_bytes = IntGauge::new(
            "tern_queued_bytes",
            "Bytes of the messages waiting in session queues (as limits.max_queued_bytes counts them), not yet sent",
        )?;
        let inflight = IntGauge::new(
            "tern_inflight_messages",
            "QoS 1/2 messages sent to clients and not yet acknowledged",
        )?;
        let reservations_open = IntGauge::new(
            "tern_reservations_open",
            "Places reserved in persistent queues (sessions and shared groups) whose store commit has not settled; returns to 0 whenever the store is idle",
        )?;
        // A gauge with its own label, not `le`: `le` belongs to histograms, whose buckets
        // count observations over time, while these are counted afresh at each scrape.
        let depth_vec = IntGaugeVec::new(
            Opts::new(
                "tern_sessions_by_queue_depth",
                "Sessions whose queue holds at most `at_most` messages (cumulative; at_most=\"+Inf\" is every session; counted at scrape time)",
            ),
            &["at_most"],
        )?;
        let mut queue_depth: Vec<IntGauge> = crate::session::registry::QUEUE_DEPTH_BUCKETS
            .iter()
            .map(|b| depth_vec.with_label_values(&[&b.to_string()]))
            .collect();
        queue_depth.push(depth_vec.with_label_values(&["+Inf"]));
        let uptime = IntGauge::new("tern_uptime_seconds", "Seconds since the broker started")?;
        let build_info = IntGaugeVec::new(
            Opts::new("tern_build_info", "Always 1; the version is in the label"),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for c in [
            &queued,
            &queued_bytes,
            &inflight,
            &reservations_open,
            &uptime,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(depth_vec))?;
        registry.register(Box::new(build_info))?;
        let sessions =
            IntGaugeVec::new(Opts::new("tern_sessions", "Sessions, by state"), &["state"])?;
        let subscriptions = IntGauge::new("tern_subscriptions", "Subscriptions in the index")?;
        let retained = IntGauge::new("tern_retained_messages", "Retained messages stored")?;
        let labels = &["group", "filter"];
        let shared = SharedVecs {
            members: IntGaugeVec::new(
                Opts::new("tern_shared_members", "Members of a shared subscription group"),
                labels,
            )?,
            queued: IntGaugeVec::new(
                Opts::new(
                    "tern_shared_queued_messages",
                    "Messages in a shared subscription group's queue (memory and disk), not yet given to a member",
                ),
                labels,
            )?,
            delivered: IntCounterVec::new(
                Opts::new(
                    "tern_shared_messages_delivered_total",
                    "Messages a shared subscription group gave to a member (redeliveries included)",
                ),
                labels,
            )?,
            redelivered: IntCounterVec::new(
                Opts::new(
                    "tern_shared_messages_redelivered_total",
                    "Messages that went back to a shared subscription group because the member left before finishing them",
                ),
                labels,
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "tern_shared_messages_dropped_total",
                    "Messages a shared subscription group's full queue could not take (also in tern_messages_dropped_total{reason=\"queue_full\"})",
                ),
                labels,
            )?,
        };
        registry.register(Box::new(shared.members.clone()))?;
        registry.register(Box::new(shared.queued.clone()))?;
        registry.register(Box::new(shared.delivered.clone()))?;
        registry.register(Box::new(shared.redelivered.clone()))?;
        registry.register(Box::new(shared.dropped.clone()))?;
        let backpressure_pauses = IntCounter::new(
            "tern_backpressure_pauses_total",
            "Times a publisher was paused because a queue it publishes to was 3/4 full",
        )?;
        registry.register(Box::new(backpressure_pauses.clone()))?;
        let cluster = ClusterMetrics::new(&registry)?;
        let queues = QueueVecs::new(&registry)?;
        let lag = LagVecs::new(&registry)?;
        let bridges = BridgeVecs::new(&registry)?;
        let storage = StorageMetrics {
            commits: IntCounter::new(
                "tern_storage_commits_total",
                "Group commits written by the storage thread",
            )?,
            syncs: IntCounter::new(
                "tern_storage_syncs_total",
                "Group commits synced to disk (fdatasync; storage.durability = fsync only)",
            )?,
            ops: IntCounter::new(
                "tern_storage_ops_total",
                "Storage operations (message, queue, session ... changes) committed",
            )?,
            commit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "tern_storage_commit_seconds",
                    "Time to apply, write and persist one group commit",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    1.0,
                ]),
            )?,
            batch_submits: Histogram::with_opts(
                HistogramOpts::new(
                    "tern_storage_batch_submits",
                    "Submits (from all connections) grouped into one commit",
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0,
                ]),
            )?,
        };
        registry.register(Box::new(storage.commits.clone()))?;
        registry.register(Box::new(storage.syncs.clone()))?;
        registry.register(Box::new(storage.ops.clone()))?;
        registry.register(Box::new(storage.commit_seconds.clone()))?;
        registry.register(Box::new(storage.batch_submits.clone()))?;

        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(connections_total.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(received.clone()))?;
        registry.register(Box::new(sent.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(dropped.clone()))?;
        registry.register(Box::new(protocol_errors.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(subscriptions.clone()))?;
        registry.register(Box::new(retained.clone()))?;
        registry.register(Box::new(process::ProcessCollector::new()?))?;

        let q = |v: &IntCounterVec| {
            [
                v.with_label_values(&["0"]),
                v.with_label_values(&["1"]),
                v.with_label_values(&["2"]),
            ]
        };
        Ok(Metrics {
            connections,
            connections_total,
            closed,
            listener_sockets,
            listener_refusals,
            jwks_failures,
            tls_not_after,
            reload_ok: reloads.with_label_values(&["success"]),
            reload_failed: reloads.with_label_values(&["failure"]),
            reload_last_success,
            reload_last_successful,
            queue_bounds,
            bridge_bounds,
            refused_max_connections: refused.with_label_values(&["max_connections"]),
            refused_connect_rate: refused.with_label_values(&["connect_rate"]),
            refused_protocol: refused.with_label_values(&["protocol"]),
            refused_auth: refused.with_label_values(&["not_authorized"]),
            refused_auth_unavailable: refused.with_label_values(&["auth_unavailable"]),
            received: q(&received),
            sent: q(&sent),
            bytes_received: bytes.with_label_values(&["received"]),
            bytes_sent: bytes.with_label_values(&["sent"]),
            dropped_queue_full: dropped.with_label_values(&["queue_full"]),
            dropped_expired: dropped.with_label_values(&["expired"]),
            dropped_too_large: dropped.with_label_values(&["too_large"]),
            dropped_not_authorized: dropped.with_label_values(&["not_authorized"]),
            dropped_no_subscribers: dropped.with_label_values(&["no_subscribers"]),
            dropped_retain_full: dropped.with_label_values(&["retained_full"]),
            dropped_storage_failed: dropped.with_label_values(&["storage_failed"]),
            dropped_overflow: dropped.with_label_values(&["overflow"]),
            dropped_purged: dropped.with_label_values(&["purged"]),
            protocol_errors,
            tls_handshakes: tls.with_label_values(&["ok"]),
            tls_failures: tls.with_label_values(&["failed"]),
            ws_handshakes: ws.with_label_values(&["ok"]),
            ws_failures: ws.with_label_values(&["failed"]),
            auth_failures,
            auth_http,
            packets_received: PacketCounters::new(&packets_in, &FROM_CLIENT),
            packets_sent: PacketCounters::new(&packets_out, &TO_CLIENT),
            queued,
            queued_bytes,
            inflight,
            reservations_open,
            queue_depth,
            uptime,
            started: std::time::Instant::now(),
            connections_max: std::sync::atomic::AtomicI64::new(0),
            storage,
            cluster,
            backpressure_pauses,
            sessions,
            subscriptions,
            retained,
            shared,
            queues,
            lag,
            bridges,
            registry,
        })
    }

    /// A client connection was accepted (CONNACK sent): counts it open.
    pub fn connected(&self) {
        self.connections.inc();
        self.connections_max
            .fetch_max(self.connections.get(), Ordering::Relaxed);
    }

    /// A client connection that was counted by [`Metrics::connected`] ended for `reason`.
    pub fn disconnected(&self, reason: CloseReason) {
        self.connections.dec();
        self.closed[reason as usize].inc();
    }

    /// Connections closed for `reason` so far.
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed[reason as usize].get()
    }

    /// The open-connections gauge of listener `kind`, resolved once by its accept loop.
    pub fn listener_connections(&self, listener: &str) -> IntGauge {
        self.listener_sockets.with_label_values(&[listener])
    }

    /// The certificate-expiry gauge of TLS listener `kind`, handed to its TLS reloader.
    /// A connection `listener` refused, for `reason` (one of a fixed few).
    pub fn listener_refused(&self, listener: &str, reason: &'static str) {
        self.listener_refusals
            .with_label_values(&[listener, reason])
            .inc();
    }

    pub fn tls_certificate_expiry(&self, listener: &str) -> IntGauge {
        self.tls_not_after.with_label_values(&[listener])
    }

    /// The certificate expiry gauge of the metrics port's own TLS (`listener="metrics"`),
    /// which is not an MQTT listener.
    pub fn metrics_certificate_expiry(&self) -> IntGauge {
        self.tls_not_after.with_label_values(&["metrics"])
    }

    /// A configuration reload ended with `result`.
    pub fn reloaded(&self, result: ReloadResult) {
        match result {
            ReloadResult::Success => {
                self.reload_ok.inc();
                self.reload_last_success.set(unix_now());
                self.reload_last_successful.set(1);
            }
            ReloadResult::Failure => {
                self.reload_failed.inc();
                self.reload_last_successful.set(0);
            }
        }
    }

    /// The configured bounds of the declared queues and bridges now in force (start and
    /// every reload); the series of removed ones go.
    pub fn set_queue_bounds<'a>(
        &self,
        queues: impl IntoIterator<Item = (&'a str, usize)>,
        bridges: impl IntoIterator<Item = (&'a str, usize)>,
    ) {
        self.queue_bounds.reset();
        for (name, max) in queues {
            self.queue_bounds.with_label_values(&[name]).set(max as i64);
        }
        self.bridge_bounds.reset();
        for (name, max) in bridges {
            self.bridge_bounds
                .with_label_values(&[name])
                .set(max as i64);
        }
    }

    pub fn connections_max(&self) -> i64 {
        self.connections_max.load(Ordering::Relaxed)
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// PUBLISH packets received from clients, all QoS.
    pub fn publish_received(&self) -> u64 {
        self.received.iter().map(|c| c.get()).sum()
    }

    /// PUBLISH packets sent to clients, all QoS.
    pub fn publish_sent(&self) -> u64 {
        self.sent.iter().map(|c| c.get()).sum()
    }

    /// Messages dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        [
            &self.dropped_queue_full,
            &self.dropped_expired,
            &self.dropped_too_large,
            &self.dropped_not_authorized,
            &self.dropped_no_subscribers,
            &self.dropped_retain_full,
            &self.dropped_storage_failed,
            &self.dropped_overflow,
        ]
        .iter()
        .map(|c| c.get())
        .sum()
    }

    /// The counters of group `share`/`filter`, resolved once.
    pub fn group_metrics(&self, share: &str, filter: &str) -> GroupMetrics {
        let l = &[share, filter];
        GroupMetrics {
            delivered: self.shared.delivered.with_label_values(l),
            redelivered: self.shared.redelivered.with_label_values(l),
            dropped: self.shared.dropped.with_label_values(l),
            // A shared group has no time to live and never drops its oldest.
            expired: None,
            evicted: None,
            latency: self.lag.latency("shared", share, filter),
        }
    }

    /// The counters of declared queue `name`, resolved once.
    pub fn queue_metrics(&self, name: &str) -> GroupMetrics {
        let q = &self.queues;
        GroupMetrics {
            delivered: q.delivered.with_label_values(&[name]),
            redelivered: q.redelivered.with_label_values(&[name]),
            dropped: q.dropped.with_label_values(&[name, "queue_full"]),
            expired: Some(q.dropped.with_label_values(&[name, "expired"])),
            evicted: Some(q.dropped.with_label_values(&[name, "overflow"])),
            latency: self.lag.latency("queue", name, ""),
        }
    }

    /// The counters of bridge `name`'s outgoing queue, resolved once.
    pub fn bridge_queue_metrics(&self, name: &str) -> GroupMetrics {
        let b = &self.bridges;
        GroupMetrics {
            delivered: b.sent.with_label_values(&[name]),
            redelivered: b.resent.with_label_values(&[name]),
            dropped: b.dropped.with_label_values(&[name, "queue_full"]),
            expired: None,
            evicted: None,
            latency: self.lag.latency("bridge", name, ""),
        }
    }

    /// The counters of bridge `name`'s link.
    pub fn bridge_metrics(&self, name: &str) -> BridgeMetrics {
        let b = &self.bridges;
        BridgeMetrics {
            connected: b.connected.with_label_values(&[name]),
            received: b.received.with_label_values(&[name]),
            reconnects: b.reconnects.with_label_values(&[name]),
            not_authorized: b.dropped.with_label_values(&[name, "not_authorized"]),
            echoes: b.dropped.with_label_values(&[name, "echo"]),
            refused: b.dropped.with_label_values(&[name, "refused"]),
        }
    }

    /// Drops an ended bridge's series (its queue ended: removed and empty).
    pub fn forget_bridge_queue(&self, name: &str) {
        let b = &self.bridges;
        let l = &[name];
        let _ = b.connected.remove_label_values(l);
        let _ = b.queued.remove_label_values(l);
        let _ = b.sent.remove_label_values(l);
        let _ = b.resent.remove_label_values(l);
        let _ = b.received.remove_label_values(l);
        let _ = b.reconnects.remove_label_values(l);
        for reason in ["queue_full", "not_authorized", "echo", "refused"] {
            let _ = b.dropped.remove_label_values(&[name, reason]);
        }
        self.lag.forget(&self.queues.oldest, "bridge", name, "");
    }

    /// Drops an ended declared queue's series.
    pub fn forget_queue(&self, name: &str) {
        let q = &self.queues;
        let _ = q.messages.remove_label_values(&[name]);
        let _ = q.consumers.remove_label_values(&[name]);
        self.lag.forget(&q.oldest, "queue", name, "");
        let _ = q.delivered.remove_label_values(&[name]);
        let _ = q.redelivered.remove_label_values(&[name]);
        for reason in ["queue_full", "expired", "overflow"] {
            let _ = q.dropped.remove_label_values(&[name, reason]);
        }
    }

    /// Drops an ended group's series.
    pub fn forget_group(&self, share: &str, filter: &str) {
        let l = &[share, filter];
        let _ = self.shared.members.remove_label_values(l);
        let _ = self.shared.queued.remove_label_values(l);
        let _ = self.shared.delivered.remove_label_values(l);
        let _ = self.shared.redelivered.remove_label_values(l);
        let _ = self.shared.dropped.remove_label_values(l);
        self.lag
            .forget(&self.queues.oldest, "shared", share, filter);
    }

    /// Text exposition of every metric, with the state gauges set from `state`.
    pub fn render(&self, state: &BrokerState) -> Vec<u8> {
        let st = &state.sessions;
        let seen = self.jwks_failures.get();
        if state.jwks_failures > seen {
            self.jwks_failures.inc_by(state.jwks_failures - seen);
        }
        self.sessions
            .with_label_values(&["online"])
            .set(st.online as i64);
        self.sessions
            .with_label_values(&["offline"])
            .set(st.offline as i64);
        self.queued.set(st.queued as i64);
        self.queued_bytes.set(st.queued_bytes as i64);
        self.inflight.set(st.inflight as i64);
        let groups_reserved: usize = state.groups.iter().map(|g| g.reservations_open).sum();
        self.reservations_open
            .set((st.reservations_open + groups_reserved) as i64);
        for (g, n) in self.queue_depth.iter().zip(st.depth.iter()) {
            g.set(*n as i64);
        }
        if let Some(all) = self.queue_depth.last() {
            all.set((st.online + st.offline) as i64);
        }
        self.uptime.set(self.started.elapsed().as_secs() as i64);
        self.subscriptions.set(state.subscriptions as i64);
        self.retained.set(state.retained as i64);
        for g in &state.groups {
            if g.bridge {
                let name = g.share.as_str();
                self.bridges
                    .queued
                    .with_label_values(&[name])
                    .set(g.queued as i64);
                self.queues
                    .oldest
                    .with_label_values(&["bridge", name])
                    .set(g.oldest_age.unwrap_or(0) as i64);
                continue;
            }
            if let Some(age) = g.oldest_age {
                let q = &self.queues;
                let name = g.share.as_str();
                q.messages.with_label_values(&[name]).set(g.queued as i64);
                q.consumers.with_label_values(&[name]).set(g.members as i64);
                q.oldest.with_label_values(&["queue", name]).set(age as i64);
                continue;
            }
            let l = &[g.share.as_str(), g.filter.as_str()];
            self.shared
                .members
                .with_label_values(l)
                .set(g.members as i64);
            self.shared.queued.with_label_values(l).set(g.queued as i64);
            let (kind, name) = lag_labels("shared", &g.share, &g.filter);
            let oldest = &self.queues.oldest;
            oldest.with_label_values(&[kind, &name]).set(g.age as i64);
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for I/O reasons; a failure would be a bug in a
        // collector, and an empty body is the honest answer then.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            out.clear();
        }
        out
    }
}

/// A shared subscription group's (or declared queue's) counters, resolved once when the
/// group is made.
pub struct GroupMetrics {
    pub delivered: IntCounter,
    pub redelivered: IntCounter,
    /// Refused by a full queue.
    pub dropped: IntCounter,
    /// Past a declared queue's `message_ttl` at its head (declared queues only).
    pub expired: Option<IntCounter>,
    /// The oldest, dropped by a full declared queue to make room (declared queues only).
    pub evicted: Option<IntCounter>,
    /// Publish-to-acknowledge latency of the group's deliveries (consumer lag).
    pub latency: Histogram,
}

impl GroupMetrics {
    pub fn expired(&self, n: u64) {
        if let Some(c) = &self.expired {
            c.inc_by(n);
        }
    }

    pub fn evicted(&self, n: u64) {
        if let Some(c) = &self.evicted {
            c.inc_by(n);
        }
    }
}

/// The broker's state as a scrape reports it, read by the HTTP side just before rendering.
#[derive(Debug, Default)]
pub struct BrokerState {
    /// Failed JWKS fetches of the JWT backend since start.
    pub jwks_failures: u64,
    pub sessions: SessionStats,
    pub subscriptions: usize,
    pub retained: usize,
    pub groups: Vec<GroupState>,
}

/// One shared subscription group at scrape time.
#[derive(Debug)]
pub struct GroupState {
    /// The ShareName, or a declared queue's name.
    pub share: String,
    pub filter: String,
    pub members: usize,
    pub queued: usize,
    pub reservations_open: usize,
    /// A declared queue or bridge: the age of its oldest message in seconds. None: a shared
    /// group.
    pub oldest_age: Option<u64>,
    /// A bridge's outgoing queue (`share` is the bridge's name).
    pub bridge: bool,
    /// Seconds the oldest waiting message has waited, for every kind of group (consumer
    /// lag: a `$share` group's too).
    pub age: u64,
}

/// Storage thread metrics; a clone is handed to the store as its commit observer.
#[derive(Clone)]
pub struct StorageMetrics {
    pub commits: IntCounter,
    pub syncs: IntCounter,
    pub ops: IntCounter,
    pub commit_seconds: Histogram,
    pub batch_submits: Histogram,
}

impl crate::storage::CommitObserver for StorageMetrics {
    fn observe(&self, submits: usize, ops: usize, elapsed: Duration, synced: bool) {
        self.commits.inc();
        if synced {
            self.syncs.inc();
        }
        self.ops.inc_by(ops as u64);
        self.commit_seconds.observe(elapsed.as_secs_f64());
        self.batch_submits.observe(submits as f64);
    }
}

/// The standard `process_*` metrics, read at each scrape.
///
/// Ours rather than the prometheus crate's `ProcessCollector`: that one exports
/// `process_cpu_seconds_total` as an integer counter of whole seconds (clock ticks divided
/// with an integer division), so a broker using 0.3 CPU shows a flat line with a step every
/// few seconds and `rate()` over a minute jumps between values. Here CPU time comes from
/// `getrusage` (microseconds); the rest from `/proc/self` as Prometheus' own client
/// libraries read it (names and meanings as in the Prometheus client guidelines).
mod process {
    use prometheus::core::{Collector, Desc};
    use prometheus::{proto, Counter, IntGauge};
    use std::sync::{Mutex, PoisonError};

    pub struct ProcessCollector {
        cpu: Counter,
        /// Serialises the read-then-add of `cpu` between concurrent scrapes.
        cpu_lock: Mutex<()>,
        open_fds: IntGauge,
        max_fds: IntGauge,
        virtual_bytes: IntGauge,
        resident_bytes: IntGauge,
        start_time: IntGauge,
        threads: IntGauge,
        descs: Vec<Desc>,
    }

    impl ProcessCollector {
        pub fn new() -> Result<ProcessCollector, prometheus::Error> {
            let cpu = Counter::new(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds (getrusage, microsecond resolution)",
            )?;
            let open_fds = IntGauge::new("process_open_fds", "Number of open file descriptors")?;
            let max_fds = IntGauge::new(
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit)",
            )?;
            let virtual_bytes = IntGauge::new(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
            )?;
            let resident_bytes = IntGauge::new(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
            )?;
            let start_time = IntGauge::new(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
            )?;
            start_time.set(start_time_seconds().unwrap_or(0));
            let threads = IntGauge::new("process_threads", "Number of OS threads in the process")?;
            let mut descs = Vec::new();
            for c in [
                &open_fds,
                &max_fds,
                &virtual_bytes,
                &resident_bytes,
                &start_time,
                &threads,
            ] {
                descs.extend(c.desc().into_iter().cloned());
            }
            descs.extend(cpu.desc().into_iter().cloned());
            Ok(ProcessCollector {
                cpu,
                cpu_lock: Mutex::new(()),
                open_fds,
                max_fds,
                virtual_bytes,
                resident_bytes,
                start_time,
                threads,
                descs,
            })
        }
    }

    impl Collector for ProcessCollector {
        fn desc(&self) -> Vec<&Desc> {
            self.descs.iter().collect()
        }

        fn collect(&self) -> Vec<proto::MetricFamily> {
            let mut out = Vec::new();
            if let Some(seconds) = cpu_seconds() {
                let _guard = self.cpu_lock.lock().unwrap_or_else(PoisonError::into_inner);
                let past = self.cpu.get();
                if seconds > past {
                    self.cpu.inc_by(seconds - past);
                }
                out.extend(self.cpu.collect());
            }
            if let Some(n) = open_fds() {
                self.open_fds.set(n);
                out.extend(self.open_fds.collect());
            }
            if let Some(n) = max_fds() {
                self.max_fds.set(n);
                out.extend(self.max_fds.collect());
            }
            if let Some(stat) = Stat::read() {
                self.virtual_bytes.set(stat.vsize);
                self.resident_bytes.set(stat.rss_pages * page_size());
                self.threads.set(stat.threads);
                out.extend(self.virtual_bytes.collect());
                out.extend(self.resident_bytes.collect());
                out.extend(self.threads.collect());
            }
            if self.start_time.get() > 0 {
                out.extend(self.start_time.collect());
            }
            out
        }
    }

    /// User plus system CPU time of the whole process (every thread), in seconds.
    pub(super) fn cpu_seconds() -> Option<f64> {
        // SAFETY: getrusage writes only into the struct we pass; an all-zero rusage is valid.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
            return None;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Some(tv(u.ru_utime) + tv(u.ru_stime))
    }

    fn open_fds() -> Option<i64> {
        let dir = std::fs::read_dir("/proc/self/fd").ok()?;
        // The directory handle read_dir holds is one of the entries; not ours to count.
        Some((dir.count() as i64 - 1).max(0))
    }

    fn max_fds() -> Option<i64> {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only into the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return None;
        }
        Some(i64::try_from(lim.rlim_cur).unwrap_or(i64::MAX))
    }

    fn page_size() -> i64 {
        // SAFETY: sysconf has no memory effects.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 {
            n as i64
        } else {
            4096
        }
    }

    fn clock_ticks() -> i64 {
        // SAFETY: sysconf has no memory effects.
        let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if n > 0 {
            n as i64
        } else {
            100
        }
    }

    /// The fields of `/proc/self/stat` we use.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Stat {
        pub threads: i64,
        /// Clock ticks after boot.
        pub start_ticks: i64,
        pub vsize: i64,
        pub rss_pages: i64,
    }

    impl Stat {
        fn read() -> Option<Stat> {
            Stat::parse(&std::fs::read_to_string("/proc/self/stat").ok()?)
        }

        /// Parses a `/proc/PID/stat` line. The command name (field 2) is in parentheses and
        /// may itself hold spaces and parentheses, so fields are counted after its last ')'.
        pub(super) fn parse(line: &str) -> Option<Stat> {
            let rest = &line[line.rfind(')')? + 1..];
            // Field 3 (state) is the first after the name; proc(5) numbers from 1.
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| -> Option<i64> { f.get(n - 3)?.parse().ok() };
            Some(Stat {
                threads: field(20)?,
                start_ticks: field(22)?,
                vsize: field(23)?,
                rss_pages: field(24)?,
            })
        }
    }

    /// The process's start, from its start in ticks after boot and the boot time.
    fn start_time_seconds() -> Option<i64> {
        let stat = Stat::read()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let btime: i64 = boot
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(btime + stat.start_ticks / clock_ticks())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(m: &Metrics) -> String {
        String::from_utf8(m.render(&BrokerState::default())).unwrap()
    }

    /// The value of the one sample named exactly `series` (name and labels as exposed).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_stat_line_is_read_after_the_last_parenthesis() {
        // A command name with spaces and a ')' of its own, as a thread may rename itself.
        let line = "4242 (tern (main) x) S 1 4242 4242 0 -1 4194560 1 0 0 0 7 3 0 0 20 0 \
                    9 0 123456 987654321 2500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1";
        assert_eq!(
            process::Stat::parse(line),
            Some(process::Stat {
                threads: 9,
                start_ticks: 123456,
                vsize: 987654321,
                rss_pages: 2500,
            })
        );
        assert_eq!(process::Stat::parse("4242 (tern) S 1 2"), None);
    }

    /// The CPU counter moves by what the process spends, not in whole seconds: after a few
    /// tens of milliseconds of work it has a fractional part the old collector never showed.
    #[test]
    fn cpu_seconds_have_sub_second_resolution() {
        let m = Metrics::new().unwrap();
        let before = sample(&exposition(&m), "process_cpu_seconds_total").unwrap();
        let start = process::cpu_seconds().unwrap();
        let mut x = 0u64;
        // Bounded: at most 10^9 steps, stopping once 30 ms of CPU were spent.
        for i in 0..1_000_000_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            if i % 100_000 == 0 && process::cpu_seconds().unwrap() - start > 0.03 {
                break;
            }
        }
        std::hint::black_box(x);
        let after = sample(&exposition(&m), "process_cpu_seconds_total").unwrap();
        assert!(after - before >= 0.03, "{before} -> {after}");
        assert!(
            after.fract() != 0.0 || before.fract() != 0.0,
            "{before} -> {after}"
        );
        assert!(sample(&exposition(&m), "process_resident_memory_bytes").unwrap() > 0.0);
        assert!(sample(&exposition(&m), "process_open_fds").unwrap() > 0.0);
        assert!(sample(&exposition(&m), "process_threads").unwrap() >= 1.0);
        assert!(sample(&exposition(&m), "process_start_time_seconds").unwrap() > 1.6e9);
    }

    #[test]
    fn closes_are_counted_by_reason_and_leave_the_open_gauge() {
        let m = Metrics::new().unwrap();
        m.connected();
        m.connected();
        m.disconnected(CloseReason::KeepAliveTimeout);
        let text = exposition(&m);
        assert_eq!(sample(&text, "tern_connections_open"), Some(1.0));
        for r in CloseReason::ALL {
            let series = format!("tern_connections_closed_total{{reason=\"{}\"}}", r.label());
            let want = if r == CloseReason::KeepAliveTimeout {
                1.0
            } else {
                0.0
            };
            assert_eq!(sample(&text, &series), Some(want), "{series}");
        }
    }

    #[test]
    fn reloads_are_counted_and_the_last_result_kept() {
        let m = Metrics::new().unwrap();
        let text = exposition(&m);
        assert_eq!(
            sample(&text, "tern_config_last_reload_successful"),
            Some(1.0)
        );
        let started = sample(&text, "tern_config_last_reload_success_timestamp_seconds").unwrap();
        assert!(started > 1.6e9);
        m.reloaded(ReloadResult::Failure);
        let text = exposition(&m);
        assert_eq!(
            sample(&text, "tern_config_last_reload_successful"),
            Some(0.0)
        );
        assert_eq!(
            sample(&text, "tern_config_reloads_total{result=\"failure\"}"),
            Some(1.0)
        );
        m.reloaded(ReloadResult::Success);
        let text = exposition(&m);
        assert_eq!(
            sample(&text, "tern_config_last_reload_successful"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "tern_config_reloads_total{result=\"success\"}"),
            Some(1.0)
        );
    }

    #[test]
    fn queue_bounds_follow_the_configuration() {
        let m = Metrics::new().unwrap();
        m.set_queue_bounds([("jobs", 100), ("old", 5)], [("up", 7)]);
        m.set_queue_bounds([("jobs", 200)], []);
        let text = exposition(&m);
        assert_eq!(
            sample(&text, "tern_queue_max_messages{queue=\"jobs\"}"),
            Some(200.0)
        );
        assert_eq!(
            sample(&text, "tern_queue_max_messages{queue=\"old\"}"),
            None
        );
        assert_eq!(
            sample(&text, "tern_bridge_max_queued_messages{bridge=\"up\"}"),
            None
        );
    }
}
