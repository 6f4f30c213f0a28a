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
