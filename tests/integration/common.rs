//! Shared helpers: an in-process broker per test, and thin wrappers around rumqttc's 3.1.1 and
//! v5 clients whose event loops run in their own task and forward every incoming packet into a
//! channel. Every wait is bounded by a timeout.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for any single wait on something that is expected to happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for something that must NOT happen.
pub const QUIET: Duration = Duration::from_millis(400);

/// Listeners on port 0, anonymous clients: the base every test broker starts from.
pub const BASE_CONFIG: &str = r#"
[listeners.tcp]
bind = "127.0.0.1:0"
[metrics]
bind = "127.0.0.1:0"
[auth]
allow_anonymous = true
"#;

/// One broker started in-process for one test.
pub struct Broker {
    running: tern::Running,
    pub tcp: SocketAddr,
    pub metrics: SocketAddr,
    /// The `[listeners.ws]` address, when the test configured that listener.
    pub ws: Option<SocketAddr>,
    data_dir: Option<std::path::PathBuf>,
}

impl Broker {
    /// Starts a broker with the base configuration plus `extra` TOML (which must not repeat the
    /// base's tables: `listeners.tcp`, `metrics`, `auth`).
    pub async fn start(extra: &str) -> Broker {
        Broker::start_raw(&format!("{BASE_CONFIG}\n{extra}\n")).await
    }

    /// Starts a broker from a complete configuration text (must bind both listeners to port 0).
    /// Without a `[storage]` table it gets the durable default in a directory of its own.
    pub async fn start_raw(text: &str) -> Broker {
        let mut text = text.to_string();
        let mut data_dir = None;
        if !text.contains("[storage]") {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("tern-it-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            text.push_str(&format!(
                "\n[storage]\ndir = {:?}\n",
                dir.display().to_string()
            ));
            data_dir = Some(dir);
        }
        let config = tern::Config::from_toml(&text).expect("test configuration is valid");
        let running = tokio::time::timeout(WAIT, tern::start(config))
            .await
            .expect("broker started in time")
            .expect("broker starts");
        let tcp = running.tcp_addr().expect("tcp listener bound");
        let metrics = running.metrics_addr().expect("metrics listener bound");
        let ws = running.ws_addr();
        Broker {
            running,
            tcp,
            metrics,
            ws,
            data_dir,
        }
    }

    pub async fn default() -> Broker {
        Broker::start("").await
    }

    pub fn port(&self) -> u16 {
        self.tcp.port()
    }

    pub async fn stop(self) {
        tokio::time::timeout(
            Duration::from_secs(5),
            self.running.shutdown(Duration::from_millis(500)),
        )
        .await
        .expect("broker shut down in time");
        if let Some(dir) = self.data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// The Prometheus text from `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let addr = self.metrics;
        tokio::time::timeout(WAIT, async move {
            let mut s = TcpStream::connect(addr).await.expect("connect to metrics");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("send request");
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.expect("read response");
            let text = String::from_utf8(buf).expect("utf-8 response");
            assert!(
                text.starts_with("HTTP/1.1 200"),
                "unexpected metrics response: {text}"
            );
            text
        })
        .await
        .expect("metrics answered in time")
    }

    /// Value of the sample whose name-and-labels part is exactly `series`
    /// (e.g. `tern_messages_dropped_total{reason="queue_full"}`).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics_text().await;
        metric_value(&text, series)
    }
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let rest = rest.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// A fresh, test-unique client id.
pub fn cid(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// MQTT 3.1.1 client wrapper.
pub mod v3 {
    use super::WAIT;
    use rumqttc::{
        AsyncClient, ConnAck, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet,
        Publish, QoS, SubscribeReasonCode,
    };
    use std::collections::VecDeque;
    use std::time::Duration;
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    #[derive(Debug)]
    pub enum Closed {
        /// CONNACK with a non-zero return code.
        Refused(ConnectReturnCode),
        /// Any other event loop failure (typically the broker closed the socket).
        Other(#[allow(dead_code)] String),
    }

    #[derive(Debug)]
    pub enum Ev {
        Pkt(Packet),
        /// The event loop failed (connection closed, refused, ...); the task has ended.
        Closed(Closed),
    }

    pub struct Client {
        pub client: AsyncClient,
        pub connack: ConnAck,
        pub id: String,
        rx: mpsc::UnboundedReceiver<Ev>,
        stash: VecDeque<Ev>,
        task: JoinHandle<()>,
    }

    pub fn opts(id: &str, port: u16) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(1024 * 1024, 1024 * 1024);
        o
    }

    /// Connects with clean session = true.
    pub async fn connect(port: u16, id: &str) -> Client {
        connect_with(opts(id, port)).await
    }

    /// Connects and waits for CONNACK; panics on timeout or failure.
    pub async fn connect_with(o: MqttOptions) -> Client {
        let id = o.client_id();
        match try_connect_with(o).await {
            Ok(c) => c,
            Err(e) => panic!("{id}: connect failed: {e:?}"),
        }
    }

    /// Connects; Err when the event loop fails before a successful CONNACK.
    pub async fn try_connect_with(o: MqttOptions) -> Result<Client, Closed> {
        let id = o.client_id();
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Ev::Pkt(p)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(ConnectionError::ConnectionRefused(code)) => {
                        let _ = tx.send(Ev::Closed(Closed::Refused(code)));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Ev::Closed(Closed::Other(e.to_string())));
                        return;
                    }
                }
            }
        });
        let connack = match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(Ev::Pkt(Packet::ConnAck(c)))) => c,
            Ok(Some(Ev::Closed(c))) => return Err(c),
            other => panic!("{id}: expected CONNACK, got {other:?}"),
        };
        Ok(Client {
            client,
            connack,
            id,
            rx,
            stash: VecDeque::new(),
            task,
        })
    }

    impl Client {
        /// The next event that satisfies `f`; others are kept for later calls. None on timeout.
        pub async fn next_where(
            &mut self,
            within: Duration,
            f: impl Fn(&Ev) -> bool,
        ) -> Option<Ev> {
            if let Some(i) = self.stash.iter().position(&f) {
                return self.stash.remove(i);
            }
            let deadline = tokio::time::Instant::now() + within;
            loop {
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(ev)) if f(&ev) => return Some(ev),
                    Ok(Some(ev)) => self.stash.push_back(ev),
                    Ok(None) | Err(_) => return None,
                }
            }
        }

        /// The next PUBLISH delivered to this client.
        pub async fn recv_publish(&mut self) -> Publish {
            self.try_recv_publish(WAIT)
                .await
                .unwrap_or_else(|| panic!("{}: no PUBLISH within {WAIT:?}", self.id))
        }

        pub async fn try_recv_publish(&mut self, within: Duration) -> Option<Publish> {
            match self
                .next_where(within, |e| {
                    matches!(e, Ev::Pkt(Packet::Publish(_)) | Ev::Closed(_))
                })
                .await
            {
                Some(Ev::Pkt(Packet::Publish(p))) => Some(p),
                Some(Ev::Closed(e)) => {
                    panic!("{}: connection closed while waiting: {e:?}", self.id)
                }
                _ => None,
            }
        }

        /// Asserts that no PUBLISH arrives within `within`.
        pub async fn expect_no_publish(&mut self, within: Duration) {
            if let Some(p) = self.try_recv_publish(within).await {
                panic!("{}: unexpected PUBLISH {p:?}", self.id);
            }
        }

        /// Subscribes and returns the SUBACK return codes.
        pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
            self.client
                .subscribe(filter, qos)
                .await
                .expect("queue SUBSCRIBE");
            self.wait_suback().await
        }

        pub async fn wait_suback(&mut self) -> Vec<SubscribeReasonCode> {
            match self
                .next_where(WAIT, |e| {
                    matches!(e, Ev::Pkt(Packet::SubAck(_)) | Ev::Closed(_))
                })
                .await
            {
                Some(Ev::Pkt(Packet::SubAck(s))) => s.return_codes,
                other => panic!("{}: expected SUBACK, got {other:?}", self.id),
            }
        }

        /// Publishes and, for QoS 1/2, waits for the PUBACK / PUBCOMP.
        pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
            self.client
                .publish(topic, qos, retain, payload.to_vec())
                .await
                .expect("queue PUBLISH");
            self.wait_ack(qos).await;
        }

        pub async fn wait_ack(&mut self, qos: QoS) {
            let want = |e: &Ev| match qos {
                QoS::AtMostOnce => false,
                QoS::AtLeastOnce => matches!(e, Ev::Pkt(Packet::PubAck(_)) | Ev::Closed(_)),
                QoS::ExactlyOnce => matches!(e, Ev::Pkt(Packet::PubComp(_)) | Ev::Closed(_)),
            };
            if qos == QoS::AtMostOnce {
                return;
            }
            match self.next_where(WAIT, want).await {
                Some(Ev::Pkt(_)) => {}
                other => panic!("{}: expected ack for {qos:?}, got {other:?}", self.id),
            }
        }

        /// Waits until the connection is closed (event loop error); returns its description.
        pub async fn wait_closed(&mut self, within: Duration) -> Option<Closed> {
            match self
                .next_where(within, |e| matches!(e, Ev::Closed(_)))
                .await
            {
                Some(Ev::Closed(e)) => Some(e),
                _ => None,
            }
        }

        /// Normal DISCONNECT; waits for the broker to close the connection.
        pub async fn disconnect(mut self) {
            self.client.disconnect().await.expect("queue DISCONNECT");
            let closed = self.wait_closed(WAIT).await;
            assert!(
                closed.is_some(),
                "{}: broker did not close after DISCONNECT",
                self.id
            );
            self.task.abort();
        }

        /// Drops the connection without DISCONNECT (abnormal close).
        pub async fn kill(mut self) {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }

    impl Drop for Client {
        fn drop(&mut self) {
            self.task.abort();
        }
    }
}

/// MQTT 5 client wrapper.
pub mod v5 {
    use super::WAIT;
    use rumqttc::v5::mqttbytes::v5::{
        ConnAck, ConnectReturnCode, DisconnectReasonCode, Filter, Packet, PubAckReason, Publish,
        PublishProperties, SubscribeProperties, SubscribeReasonCode,
    };
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
    use std::collections::VecDeque;
    use std::time::Duration;
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    #[derive(Debug)]
    pub enum Closed {
        /// The broker sent DISCONNECT with this reason.
        ServerDisconnect(DisconnectReasonCode),
        /// A PUBACK with an error reason code (rumqttc treats it as fatal).
        PubAckFail(PubAckReason),
        /// A SUBACK with a failure code.
        SubFail(SubscribeReasonCode),
        /// CONNACK with a failure reason code.
        Refused(ConnectReturnCode),
        Other(#[allow(dead_code)] String),
    }

    #[derive(Debug)]
    #[allow(clippy::large_enum_variant)] // test-only channel item; boxing buys nothing here
    pub enum Ev {
        Pkt(Packet),
        Closed(Closed),
    }

    pub struct Client {
        pub client: AsyncClient,
        pub connack: ConnAck,
        pub id: String,
        rx: mpsc::UnboundedReceiver<Ev>,
        stash: VecDeque<Ev>,
        task: JoinHandle<()>,
    }

    pub fn opts(id: &str, port: u16) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(Some(1024 * 1024));
        o
    }

    /// Options for a persistent session: clean start = false, the given session expiry.
    pub fn persistent_opts(id: &str, port: u16, session_expiry: u32) -> MqttOptions {
        let mut o = opts(id, port);
        o.set_clean_start(false);
        let mut props = o.connect_properties().unwrap_or_default();
        props.session_expiry_interval = Some(session_expiry);
        o.set_connect_properties(props);
        o
    }

    pub async fn connect(port: u16, id: &str) -> Client {
        connect_with(opts(id, port)).await
    }

    fn classify(e: ConnectionError) -> Closed {
        match e {
            ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, .. }) => {
                Closed::ServerDisconnect(reason_code)
            }
            ConnectionError::MqttState(StateError::PubAckFail { reason }) => {
                Closed::PubAckFail(reason)
            }
            ConnectionError::MqttState(StateError::SubFail { reason }) => Closed::SubFail(reason),
            ConnectionError::ConnectionRefused(code) => Closed::Refused(code),
            e => Closed::Other(e.to_string()),
        }
    }

    /// Connects and waits for CONNACK; panics on timeout or failure.
    pub async fn connect_with(o: MqttOptions) -> Client {
        let id = o.client_id();
        match try_connect_with(o).await {
            Ok(c) => c,
            Err(e) => panic!("{id}: connect failed: {e:?}"),
        }
    }

    /// Connects; Err when the event loop fails before a successful CONNACK.
    pub async fn try_connect_with(o: MqttOptions) -> Result<Client, Closed> {
        let id = o.client_id();
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Ev::Pkt(p)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Ev::Closed(classify(e)));
                        return;
                    }
                }
            }
        });
        let connack = match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(Ev::Pkt(Packet::ConnAck(c)))) => c,
            Ok(Some(Ev::Closed(c))) => return Err(c),
            other => panic!("{id}: expected CONNACK, got {other:?}"),
        };
        Ok(Client {
            client,
            connack,
            id,
            rx,
            stash: VecDeque::new(),
            task,
        })
    }

    impl Client {
        pub async fn next_where(
            &mut self,
            within: Duration,
            f: impl Fn(&Ev) -> bool,
        ) -> Option<Ev> {
            if let Some(i) = self.stash.iter().position(&f) {
                return self.stash.remove(i);
            }
            let deadline = tokio::time::Instant::now() + within;
            loop {
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(ev)) if f(&ev) => return Some(ev),
                    Ok(Some(ev)) => self.stash.push_back(ev),
                    Ok(None) | Err(_) => return None,
                }
            }
        }

        pub async fn recv_publish(&mut self) -> Publish {
            self.try_recv_publish(WAIT)
                .await
                .unwrap_or_else(|| panic!("{}: no PUBLISH within {WAIT:?}", self.id))
        }

        pub async fn try_recv_publish(&mut self, within: Duration) -> Option<Publish> {
            match self
                .next_where(within, |e| {
                    matches!(e, Ev::Pkt(Packet::Publish(_)) | Ev::Closed(_))
                })
                .await
            {
                Some(Ev::Pkt(Packet::Publish(p))) => Some(p),
                Some(Ev::Closed(e)) => {
                    panic!("{}: connection closed while waiting: {e:?}", self.id)
                }
                _ => None,
            }
        }

        pub async fn expect_no_publish(&mut self, within: Duration) {
            if let Some(p) = self.try_recv_publish(within).await {
                panic!("{}: unexpected PUBLISH {p:?}", self.id);
            }
        }

        /// Subscribes to one filter (with options) and returns the SUBACK reason codes.
        pub async fn subscribe_filter(
            &mut self,
            filter: Filter,
            props: Option<SubscribeProperties>,
        ) -> Vec<SubscribeReasonCode> {
            match props {
                Some(p) => {
                    self.client
                        .subscribe_many_with_properties([filter], p)
                        .await
                }
                None => self.client.subscribe_many([filter]).await,
            }
            .expect("queue SUBSCRIBE");
            self.wait_suback().await
        }

        pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
            self.subscribe_filter(Filter::new(filter, qos), None).await
        }

        /// Subscribes with a Subscription Identifier.
        pub async fn subscribe_id(
            &mut self,
            filter: &str,
            qos: QoS,
            id: usize,
        ) -> Vec<SubscribeReasonCode> {
            let props = SubscribeProperties {
                id: Some(id),
                user_properties: vec![],
            };
            self.subscribe_filter(Filter::new(filter, qos), Some(props))
                .await
        }

        pub async fn wait_suback(&mut self) -> Vec<SubscribeReasonCode> {
            match self
                .next_where(WAIT, |e| {
                    matches!(e, Ev::Pkt(Packet::SubAck(_)) | Ev::Closed(_))
                })
                .await
            {
                Some(Ev::Pkt(Packet::SubAck(s))) => s.return_codes,
                other => panic!("{}: expected SUBACK, got {other:?}", self.id),
            }
        }

        pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
            self.client
                .publish(topic, qos, retain, payload.to_vec())
                .await
                .expect("queue PUBLISH");
            self.wait_ack(qos).await;
        }

        pub async fn publish_props(
            &mut self,
            topic: &str,
            qos: QoS,
            retain: bool,
            payload: &[u8],
            props: PublishProperties,
        ) {
            self.client
                .publish_with_properties(topic, qos, retain, payload.to_vec(), props)
                .await
                .expect("queue PUBLISH");
            self.wait_ack(qos).await;
        }

        pub async fn wait_ack(&mut self, qos: QoS) {
            if qos == QoS::AtMostOnce {
                return;
            }
            let want = move |e: &Ev| match qos {
                QoS::AtLeastOnce => matches!(e, Ev::Pkt(Packet::PubAck(_)) | Ev::Closed(_)),
                _ => matches!(e, Ev::Pkt(Packet::PubComp(_)) | Ev::Closed(_)),
            };
            match self.next_where(WAIT, want).await {
                Some(Ev::Pkt(_)) => {}
                other => panic!("{}: expected ack for {qos:?}, got {other:?}", self.id),
            }
        }

        pub async fn wait_closed(&mut self, within: Duration) -> Option<Closed> {
            match self
                .next_where(within, |e| matches!(e, Ev::Closed(_)))
                .await
            {
                Some(Ev::Closed(c)) => Some(c),
                _ => None,
            }
        }

        pub async fn disconnect(mut self) {
            self.client.disconnect().await.expect("queue DISCONNECT");
            let closed = self.wait_closed(WAIT).await;
            assert!(
                closed.is_some(),
                "{}: broker did not close after DISCONNECT",
                self.id
            );
            self.task.abort();
        }

        pub async fn kill(mut self) {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }

    impl Drop for Client {
        fn drop(&mut self) {
            self.task.abort();
        }
    }
}

/// One client API over both protocol versions, for scenarios that are the same in MQTT 3.1.1
/// and 5.0: a scenario is written once as `async fn NAME(v: Version)` and `both_versions!`
/// makes it the two tests `NAME::v311` and `NAME::v5`. QoS and reason / return codes are plain
/// numbers as on the wire, so an expectation that differs per version reads
/// `v.pick(v311_value, v5_value)`. What only one version can express (properties, v5 reason
/// codes rumqttc hides) stays in that version's own tests, through `v3` / `v5` above.
pub mod any {
    use super::{v3, v5, WAIT};
    use bytes::Bytes;
    use rumqttc::v5::mqttbytes::v5 as p5;
    use std::fmt;
    use std::time::Duration;

    /// Session Expiry Interval of a 5.0 persistent session: long enough to outlive any test.
    const SESSION_EXPIRY: u32 = 300;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Version {
        V311,
        V5,
    }

    impl fmt::Display for Version {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(match self {
                Version::V311 => "v311",
                Version::V5 => "v5",
            })
        }
    }

    impl Version {
        /// The expectation for this version: `v311` for MQTT 3.1.1, `v5` for MQTT 5.0.
        pub fn pick<T>(self, v311: T, v5: T) -> T {
            match self {
                Version::V311 => v311,
                Version::V5 => v5,
            }
        }

        /// A fresh, test-unique client id that names the version.
        pub fn cid(self, prefix: &str) -> String {
            super::cid(&format!("{self}-{prefix}"))
        }

        /// Options of a clean-session client (3.1.1 CleanSession=1, 5.0 Clean Start=1 and no
        /// Session Expiry Interval: the session ends with the connection in both).
        pub fn opts(self, id: &str, port: u16) -> Opts {
            match self {
                Version::V311 => Opts::V3(v3::opts(id, port)),
                Version::V5 => Opts::V5(v5::opts(id, port)),
            }
        }

        /// Connects a clean-session client; panics unless accepted.
        pub async fn connect(self, port: u16, id: &str) -> Client {
            self.opts(id, port).connect().await
        }
    }

    /// Connection options of either version.
    #[allow(clippy::large_enum_variant)] // built once per connection; boxing buys nothing here
    pub enum Opts {
        V3(rumqttc::MqttOptions),
        V5(rumqttc::v5::MqttOptions),
    }

    impl Opts {
        /// A session that outlives the connection and is resumed: 3.1.1 CleanSession=0, 5.0
        /// Clean Start=0 with a Session Expiry Interval.
        pub fn persistent(mut self) -> Self {
            match &mut self {
                Opts::V3(o) => {
                    o.set_clean_session(false);
                }
                Opts::V5(o) => {
                    o.set_clean_start(false);
                    let mut props = o.connect_properties().unwrap_or_default();
                    props.session_expiry_interval = Some(SESSION_EXPIRY);
                    o.set_connect_properties(props);
                }
            }
            self
        }

        /// The client sends no PUBACK / PUBREC until `Client::ack`.
        pub fn manual_acks(mut self) -> Self {
            match &mut self {
                Opts::V3(o) => {
                    o.set_manual_acks(true);
                }
                Opts::V5(o) => {
                    o.set_manual_acks(true);
                }
            }
            self
        }

        pub fn will(mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) -> Self {
            match &mut self {
                Opts::V3(o) => {
                    o.set_last_will(rumqttc::LastWill::new(
                        topic,
                        payload.to_vec(),
                        q3(qos),
                        retain,
                    ));
                }
                Opts::V5(o) => {
                    o.set_last_will(p5::LastWill::new(
                        topic,
                        payload.to_vec(),
                        q5(qos),
                        retain,
                        None,
                    ));
                }
            }
            self
        }

        /// Connects and waits for CONNACK; panics unless accepted.
        pub async fn connect(self) -> Client {
            match self {
                Opts::V3(o) => Client::V3(v3::connect_with(o).await),
                Opts::V5(o) => Client::V5(v5::connect_with(o).await),
            }
        }

        /// Connects; Err when the event loop fails before a successful CONNACK.
        pub async fn try_connect(self) -> Result<Client, Closed> {
            match self {
                Opts::V3(o) => v3::try_connect_with(o)
                    .await
                    .map(Client::V3)
                    .map_err(Closed::from_v3),
                Opts::V5(o) => v5::try_connect_with(o)
                    .await
                    .map(Client::V5)
                    .map_err(Closed::from_v5),
            }
        }
    }

    /// Why a connection ended, with the codes as on the wire.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Closed {
        /// CONNACK with this non-zero return code (3.1.1) or reason code (5.0).
        Refused(u8),
        /// The broker sent a 5.0 DISCONNECT with this reason code.
        Disconnect(u8),
        /// A 5.0 PUBACK failure code, which rumqttc treats as fatal to the connection.
        PubAckFail(u8),
        /// A 5.0 SUBACK failure code, which rumqttc treats as fatal to the connection.
        SubFail(u8),
        /// Anything else, typically the broker closing the socket: all a 3.1.1 client sees.
        Other(String),
    }

    impl Closed {
        fn from_v3(c: v3::Closed) -> Closed {
            match c {
                v3::Closed::Refused(code) => Closed::Refused(code as u8),
                v3::Closed::Other(e) => Closed::Other(e),
            }
        }

        fn from_v5(c: v5::Closed) -> Closed {
            match c {
                v5::Closed::ServerDisconnect(r) => Closed::Disconnect(r as u8),
                v5::Closed::PubAckFail(r) => Closed::PubAckFail(puback_code(r)),
                v5::Closed::SubFail(r) => Closed::SubFail(suback_code(r)),
                v5::Closed::Refused(r) => Closed::Refused(connack_code(r)),
                v5::Closed::Other(e) => Closed::Other(e),
            }
        }

        /// The reason code of the broker's DISCONNECT, None when it just closed the socket.
        pub fn disconnect_reason(&self) -> Option<u8> {
            match self {
                Closed::Disconnect(r) => Some(*r),
                _ => None,
            }
        }
    }

    /// A PUBLISH received by either version.
    #[derive(Debug, Clone)]
    pub struct Msg {
        pub topic: String,
        pub payload: Bytes,
        pub qos: u8,
        pub retain: bool,
        pub dup: bool,
        pub pkid: u16,
        raw: Raw,
    }

    #[derive(Debug, Clone)]
    enum Raw {
        V3(rumqttc::Publish),
        V5(p5::Publish),
    }

    impl Msg {
        fn from_v3(p: rumqttc::Publish) -> Msg {
            Msg {
                topic: p.topic.clone(),
                payload: p.payload.clone(),
                qos: p.qos as u8,
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
                raw: Raw::V3(p),
            }
        }

        fn from_v5(p: p5::Publish) -> Msg {
            Msg {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.clone(),
                qos: p.qos as u8,
                retain: p.retain,
                dup: p.dup,
                pkid: p.pkid,
                raw: Raw::V5(p),
            }
        }
    }

    /// A connected client of either version.
    #[allow(clippy::large_enum_variant)] // a handful per test; boxing buys nothing here
    pub enum Client {
        V3(v3::Client),
        V5(v5::Client),
    }

    /// A clonable handle that queues PUBLISHes without waiting (e.g. from another task).
    #[derive(Clone)]
    pub enum Sender {
        V3(rumqttc::AsyncClient),
        V5(rumqttc::v5::AsyncClient),
    }

    impl Sender {
        pub async fn publish(&self, topic: &str, qos: u8, retain: bool, payload: Vec<u8>) {
            match self {
                Sender::V3(c) => c
                    .publish(topic, q3(qos), retain, payload)
                    .await
                    .expect("queue PUBLISH"),
                Sender::V5(c) => c
                    .publish(topic, q5(qos), retain, payload)
                    .await
                    .expect("queue PUBLISH"),
            }
        }
    }

    impl Client {
        pub fn id(&self) -> &str {
            match self {
                Client::V3(c) => &c.id,
                Client::V5(c) => &c.id,
            }
        }

        pub fn session_present(&self) -> bool {
            match self {
                Client::V3(c) => c.connack.session_present,
                Client::V5(c) => c.connack.session_present,
            }
        }

        /// The Assigned Client Identifier of the CONNACK (5.0 only; None for 3.1.1).
        pub fn assigned_client_id(&self) -> Option<String> {
            match self {
                Client::V3(_) => None,
                Client::V5(c) => c
                    .connack
                    .properties
                    .as_ref()
                    .and_then(|p| p.assigned_client_identifier.clone()),
            }
        }

        pub fn sender(&self) -> Sender {
            match self {
                Client::V3(c) => Sender::V3(c.client.clone()),
                Client::V5(c) => Sender::V5(c.client.clone()),
            }
        }

        /// Subscribes to one filter; returns the SUBACK codes (granted QoS or failure code).
        /// A 5.0 failure code ends the connection (rumqttc treats it as fatal); it is returned
        /// all the same.
        pub async fn subscribe(&mut self, filter: &str, qos: u8) -> Vec<u8> {
            match self {
                Client::V3(c) => {
                    c.client
                        .subscribe(filter, q3(qos))
                        .await
                        .expect("queue SUBSCRIBE");
                    c.wait_suback()
                        .await
                        .into_iter()
                        .map(|r| match r {
                            rumqttc::SubscribeReasonCode::Success(q) => q as u8,
                            rumqttc::SubscribeReasonCode::Failure => 0x80,
                        })
                        .collect()
                }
                Client::V5(c) => {
                    c.client
                        .subscribe(filter, q5(qos))
                        .await
                        .expect("queue SUBSCRIBE");
                    match c
                        .next_where(WAIT, |e| {
                            matches!(e, v5::Ev::Pkt(p5::Packet::SubAck(_)) | v5::Ev::Closed(_))
                        })
                        .await
                    {
                        Some(v5::Ev::Pkt(p5::Packet::SubAck(s))) => {
                            s.return_codes.into_iter().map(suback_code).collect()
                        }
                        Some(v5::Ev::Closed(v5::Closed::SubFail(r))) => vec![suback_code(r)],
                        other => panic!("{}: expected SUBACK, got {other:?}", c.id),
                    }
                }
            }
        }

        /// Unsubscribes; returns the UNSUBACK reason codes (none in 3.1.1).
        pub async fn unsubscribe(&mut self, filter: &str) -> Vec<u8> {
            match self {
                Client::V3(c) => {
                    c.client
                        .unsubscribe(filter)
                        .await
                        .expect("queue UNSUBSCRIBE");
                    match c
                        .next_where(WAIT, |e| {
                            matches!(
                                e,
                                v3::Ev::Pkt(rumqttc::Packet::UnsubAck(_)) | v3::Ev::Closed(_)
                            )
                        })
                        .await
                    {
                        Some(v3::Ev::Pkt(_)) => vec![],
                        other => panic!("{}: expected UNSUBACK, got {other:?}", c.id),
                    }
                }
                Client::V5(c) => {
                    c.client
                        .unsubscribe(filter)
                        .await
                        .expect("queue UNSUBSCRIBE");
                    match c
                        .next_where(WAIT, |e| {
                            matches!(e, v5::Ev::Pkt(p5::Packet::UnsubAck(_)) | v5::Ev::Closed(_))
                        })
                        .await
                    {
                        Some(v5::Ev::Pkt(p5::Packet::UnsubAck(u))) => u
                            .reasons
                            .into_iter()
                            .map(|r| match r {
                                p5::UnsubAckReason::Success => 0x00,
                                p5::UnsubAckReason::NoSubscriptionExisted => 0x11,
                                p5::UnsubAckReason::UnspecifiedError => 0x80,
                                p5::UnsubAckReason::ImplementationSpecificError => 0x83,
                                p5::UnsubAckReason::NotAuthorized => 0x87,
                                p5::UnsubAckReason::TopicFilterInvalid => 0x8F,
                                p5::UnsubAckReason::PacketIdentifierInUse => 0x91,
                            })
                            .collect(),
                        other => panic!("{}: expected UNSUBACK, got {other:?}", c.id),
                    }
                }
            }
        }

        /// Publishes and, for QoS 1 / 2, waits for the PUBACK / PUBCOMP; panics on a failure.
        pub async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: &[u8]) {
            match self {
                Client::V3(c) => c.publish(topic, q3(qos), retain, payload).await,
                Client::V5(c) => c.publish(topic, q5(qos), retain, payload).await,
            }
        }

        /// Publishes at QoS 1 and returns the PUBACK reason code: always 0x00 in 3.1.1, whose
        /// PUBACK has none. A 5.0 failure code ends the connection (rumqttc treats it as fatal);
        /// it is returned all the same.
        pub async fn publish_rc(&mut self, topic: &str, payload: &[u8]) -> u8 {
            match self {
                Client::V3(c) => {
                    c.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                        .await;
                    0x00
                }
                Client::V5(c) => {
                    c.client
                        .publish(topic, q5(1), false, payload.to_vec())
                        .await
                        .expect("queue PUBLISH");
                    match c
                        .next_where(WAIT, |e| {
                            matches!(e, v5::Ev::Pkt(p5::Packet::PubAck(_)) | v5::Ev::Closed(_))
                        })
                        .await
                    {
                        Some(v5::Ev::Pkt(p5::Packet::PubAck(a))) => puback_code(a.reason),
                        Some(v5::Ev::Closed(v5::Closed::PubAckFail(r))) => puback_code(r),
                        other => panic!("{}: expected PUBACK, got {other:?}", c.id),
                    }
                }
            }
        }

        pub async fn recv_publish(&mut self) -> Msg {
            match self {
                Client::V3(c) => Msg::from_v3(c.recv_publish().await),
                Client::V5(c) => Msg::from_v5(c.recv_publish().await),
            }
        }

        pub async fn try_recv_publish(&mut self, within: Duration) -> Option<Msg> {
            match self {
                Client::V3(c) => c.try_recv_publish(within).await.map(Msg::from_v3),
                Client::V5(c) => c.try_recv_publish(within).await.map(Msg::from_v5),
            }
        }

        /// Asserts that no PUBLISH arrives within `within`.
        pub async fn expect_no_publish(&mut self, within: Duration) {
            match self {
                Client::V3(c) => c.expect_no_publish(within).await,
                Client::V5(c) => c.expect_no_publish(within).await,
            }
        }

        /// Acknowledges (PUBACK / PUBREC) a message received with manual acks.
        pub async fn ack(&self, m: &Msg) {
            match (self, &m.raw) {
                (Client::V3(c), Raw::V3(p)) => c.client.ack(p).await.expect("queue ack"),
                (Client::V5(c), Raw::V5(p)) => c.client.ack(p).await.expect("queue ack"),
                _ => panic!("{}: ack for a message of the other version", self.id()),
            }
        }

        /// Waits until the connection is closed; None if it is still open after `within`.
        pub async fn wait_closed(&mut self, within: Duration) -> Option<Closed> {
            match self {
                Client::V3(c) => c.wait_closed(within).await.map(Closed::from_v3),
                Client::V5(c) => c.wait_closed(within).await.map(Closed::from_v5),
            }
        }

        /// Normal DISCONNECT; waits for the broker to close the connection.
        pub async fn disconnect(self) {
            match self {
                Client::V3(c) => c.disconnect().await,
                Client::V5(c) => c.disconnect().await,
            }
        }

        /// Drops the connection without DISCONNECT (abnormal close).
        pub async fn kill(self) {
            match self {
                Client::V3(c) => c.kill().await,
                Client::V5(c) => c.kill().await,
            }
        }
    }

    pub fn q3(qos: u8) -> rumqttc::QoS {
        match qos {
            0 => rumqttc::QoS::AtMostOnce,
            1 => rumqttc::QoS::AtLeastOnce,
            2 => rumqttc::QoS::ExactlyOnce,
            q => panic!("QoS {q}"),
        }
    }

    pub fn q5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
        use rumqttc::v5::mqttbytes::QoS;
        match qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            q => panic!("QoS {q}"),
        }
    }

    fn suback_code(r: p5::SubscribeReasonCode) -> u8 {
        use p5::SubscribeReasonCode as S;
        match r {
            S::Success(q) => q as u8,
            S::Failure | S::Unspecified => 0x80,
            S::ImplementationSpecific => 0x83,
            S::NotAuthorized => 0x87,
            S::TopicFilterInvalid => 0x8F,
            S::PkidInUse => 0x91,
            S::QuotaExceeded => 0x97,
            S::SharedSubscriptionsNotSupported => 0x9E,
            S::SubscriptionIdNotSupported => 0xA1,
            S::WildcardSubscriptionsNotSupported => 0xA2,
        }
    }

    fn puback_code(r: p5::PubAckReason) -> u8 {
        use p5::PubAckReason as P;
        match r {
            P::Success => 0x00,
            P::NoMatchingSubscribers => 0x10,
            P::UnspecifiedError => 0x80,
            P::ImplementationSpecificError => 0x83,
            P::NotAuthorized => 0x87,
            P::TopicNameInvalid => 0x90,
            P::PacketIdentifierInUse => 0x91,
            P::QuotaExceeded => 0x97,
            P::PayloadFormatInvalid => 0x99,
        }
    }

    fn connack_code(r: p5::ConnectReturnCode) -> u8 {
        use p5::ConnectReturnCode as C;
        match r {
            C::Success => 0x00,
            C::UnspecifiedError => 0x80,
            C::MalformedPacket => 0x81,
            C::ProtocolError => 0x82,
            C::ImplementationSpecificError => 0x83,
            C::UnsupportedProtocolVersion => 0x84,
            C::ClientIdentifierNotValid => 0x85,
            C::BadUserNamePassword => 0x86,
            C::NotAuthorized => 0x87,
            C::ServerUnavailable => 0x88,
            C::ServerBusy => 0x89,
            C::Banned => 0x8A,
            C::BadAuthenticationMethod => 0x8C,
            C::TopicNameInvalid => 0x90,
            C::PacketTooLarge => 0x95,
            C::QuotaExceeded => 0x97,
            C::PayloadFormatInvalid => 0x99,
            C::RetainNotSupported => 0x9A,
            C::QoSNotSupported => 0x9B,
            C::UseAnotherServer => 0x9C,
            C::ServerMoved => 0x9D,
            C::ConnectionRateExceeded => 0x9F,
            // 3.1.1 return codes rumqttc's v5 codec also knows.
            C::RefusedProtocolVersion => 0x01,
            C::BadClientId => 0x02,
            C::ServiceUnavailable => 0x03,
        }
    }
}

/// Makes each listed scenario `async fn NAME(v: any::Version)` two tests, `NAME::v311` and
/// `NAME::v5` (`cargo test --test integration v311` runs one version). A scenario missing from
/// the list is dead code, which clippy's `-D warnings` rejects.
macro_rules! both_versions {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn v311() {
                super::$name(crate::common::any::Version::V311).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn v5() {
                super::$name(crate::common::any::Version::V5).await
            }
        }
    )+};
}
