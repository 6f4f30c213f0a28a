//! The bridge's MQTT client as a sans-IO state machine: bytes and `now` in, bytes, events and
//! the next timer out.
//!
//! It has the shape of the connection core (`connection/core.rs`) for the same reasons: no
//! socket and no clock inside, so its unit tests play the remote broker byte by byte (through
//! `mqttbytes`, an independent codec) and drive time by hand, and the tokio driver
//! (`link.rs`) stays a thin loop. A new core is made for every connection: nothing of a
//! session survives here. The owner (the broker's bridge) keeps what must survive a reconnect
//! in its durable queue, and re-sends what was not acknowledged with DUP set.
//!
//! Every buffer is bounded by what the owner allows: outgoing QoS 1/2 publishes by the window
//! (the owner's `window`, capped by the remote's Receive Maximum), incoming ones by packet
//! identifiers (and in v5 by the Receive Maximum we advertise), and output and events by what
//! one input chunk or one call produces, which the driver drains before reading more.
//!
//! Acknowledging an incoming QoS 1/2 message is the owner's decision (`ack_incoming`), made
//! once it has stored the message: the remote broker then keeps it until it is safe here.

use crate::protocol::{
    decode_server_packet, encode_client_disconnect, encode_connect, encode_pingreq,
    encode_pub_response, encode_publish, encode_subscribe, publish_size, validate, ConnAck,
    Connect, MqttStr, OutgoingPublish, Properties, ProtocolError, ProtocolVersion, PubResponse,
    Publish, PublishExtras, PublishProperties, QoS, ReasonCode, ServerOutcome, ServerPacket,
    SubAck, SubscriptionOptions, PUBACK, PUBCOMP, PUBREC, PUBREL,
};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// One subscription the link makes on the remote broker after every CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    pub qos: QoS,
    /// v5 No Local: the remote does not send back what this link published (a bridge in both
    /// directions on the same topics would otherwise loop). Ignored in 3.1.1, which has no
    /// such option: there the owner must keep the directions' topics apart.
    pub no_local: bool,
}

/// What one connection to the remote broker asks for.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub version: ProtocolVersion,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    /// Zero turns keep-alive off.
    pub keep_alive: Duration,
    pub clean_start: bool,
    /// v5 Session Expiry Interval in seconds.
    pub session_expiry: u32,
    pub subscriptions: Vec<Subscription>,
    /// Most QoS 1/2 publishes in flight at once (1..=65535), also capped by the remote's
    /// Receive Maximum.
    pub window: usize,
    /// The Receive Maximum we advertise (v5): most incoming QoS 1/2 messages the remote may
    /// have unacknowledged here, so at most that many wait for the owner.
    pub inbound_window: u16,
    /// Largest packet we accept (advertised in v5 as Maximum Packet Size).
    pub max_packet_size: usize,
    /// How long to wait for CONNACK (the driver uses it for TCP and TLS set-up too).
    pub connect_timeout: Duration,
}

impl LinkOptions {
    /// Options with the defaults a bridge starts from: 60 s keep-alive, clean start, a window
    /// of 100 each way, 1 MiB packets, 10 s to connect, no subscriptions.
    pub fn new(version: ProtocolVersion, client_id: impl Into<String>) -> LinkOptions {
        LinkOptions {
            version,
            client_id: client_id.into(),
            username: None,
            password: None,
            keep_alive: Duration::from_secs(60),
            clean_start: true,
            session_expiry: 0,
            subscriptions: Vec::new(),
            window: 100,
            inbound_window: 100,
            max_packet_size: 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// Checks what the wire cannot carry, so a bad configuration is an error at start-up,
    /// not a remote that drops every connection.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if self.client_id.len() > u16::MAX as usize {
            return Err(OptionsError::TooLong("client_id"));
        }
        if self
            .username
            .as_ref()
            .is_some_and(|u| u.len() > u16::MAX as usize)
        {
            return Err(OptionsError::TooLong("username"));
        }
        if self
            .password
            .as_ref()
            .is_some_and(|p| p.len() > u16::MAX as usize)
        {
            return Err(OptionsError::TooLong("password"));
        }
        if self.window == 0 || self.window > u16::MAX as usize {
            return Err(OptionsError::Window(self.window));
        }
        if self.inbound_window == 0 {
            return Err(OptionsError::InboundWindow);
        }
        if self.keep_alive.as_secs() > u64::from(u16::MAX) {
            return Err(OptionsError::KeepAlive(self.keep_alive));
        }
        if self.max_packet_size < 64 {
            return Err(OptionsError::MaxPacketSize(self.max_packet_size));
        }
        for s in &self.subscriptions {
            if !validate::is_valid_topic_filter(&s.filter) || s.filter.len() > u16::MAX as usize {
                return Err(OptionsError::Filter(s.filter.clone()));
            }
        }
        Ok(())
    }
}

/// Why [`LinkOptions`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("{0} is longer than 65535 bytes")]
    TooLong(&'static str),
    #[error("window {0} is not within 1..=65535")]
    Window(usize),
    #[error("inbound window is 0")]
    InboundWindow,
    #[error("keep-alive {0:?} is above 65535 s")]
    KeepAlive(Duration),
    #[error("maximum packet size {0} is below 64 bytes")]
    MaxPacketSize(usize),
    #[error("invalid topic filter {0:?}")]
    Filter(String),
}

/// Why a connection to the remote broker ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// CONNACK refused the connection; `reason` is the v5 code (a 3.1.1 return code is
    /// mapped to it: 4 → 0x86 Bad User Name or Password, ...).
    #[error("connection refused by the remote broker (reason 0x{reason:02x})")]
    Refused { reason: u8 },
    /// The remote sent something the protocol does not allow.
    #[error("remote broker broke the protocol: {0}")]
    Protocol(ProtocolError),
    /// DISCONNECT from the remote (v5).
    #[error("remote broker disconnected (reason 0x{reason:02x}{})", reason_string.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
    ServerDisconnect {
        reason: u8,
        reason_string: Option<String>,
    },
    #[error("no CONNACK in time")]
    ConnackTimeout,
    #[error("remote broker silent past the keep-alive")]
    KeepAliveTimeout,
    /// The owner asked to stop.
    #[error("link shut down")]
    Shutdown,
    /// The driver lost the socket (or never had one): connect, TLS, read or write errors.
    #[error("{0}")]
    Io(String),
}

impl CloseReason {
    /// The reason code behind this close, where it has one in [`ReasonCode`].
    pub fn reason_code(&self) -> Option<ReasonCode> {
        match self {
            CloseReason::Refused { reason } | CloseReason::ServerDisconnect { reason, .. } => {
                ReasonCode::from_u8(*reason)
            }
            CloseReason::Protocol(e) => Some(e.reason_code()),
            CloseReason::KeepAliveTimeout => Some(ReasonCode::KeepAliveTimeout),
            CloseReason::ConnackTimeout | CloseReason::Shutdown | CloseReason::Io(_) => None,
        }
    }
}

/// Why [`ClientCore::publish`] did not take a message. Only `Full` and `NotConnected` are
/// transient; the others will never go out on this link and are the owner's to drop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("window full")]
    Full,
    #[error("not connected")]
    NotConnected,
    #[error("packet of {size} bytes is above the remote's maximum of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("invalid topic name")]
    TopicInvalid,
}

impl PublishError {
    /// The reason code the owner records for a message that will never go out here.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            PublishError::Full | PublishError::NotConnected => ReasonCode::UnspecifiedError,
            PublishError::TooLarge { .. } => ReasonCode::PacketTooLarge,
            PublishError::TopicInvalid => ReasonCode::TopicNameInvalid,
        }
    }
}

/// A message the remote broker sent us. `packet_id` is 0 for QoS 0; for QoS 1 and 2 it is
/// what [`ClientCore::ack_incoming`] takes once the owner has stored the message.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub packet_id: u16,
    pub topic: MqttStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: PublishProperties,
}

/// What the core tells its owner, in the order it happened.
#[derive(Debug, Clone)]
pub enum Event {
    Connected {
        session_present: bool,
    },
    /// The publish with this token is done: PUBACK (QoS 1), PUBCOMP (QoS 2), a PUBREC of 0x80
    /// or more (QoS 2, refused), or at once for QoS 0 (reason 0). A reason of 0x80 or more is
    /// a refusal the remote will not retry.
    Acked {
        token: u64,
        reason: u8,
    },
    Message(Incoming),
    /// The remote refused one of [`LinkOptions::subscriptions`]; the others stand.
    SubscribeRefused {
        filter: String,
        reason: u8,
    },
    /// The last event of a core.
    Closed(CloseReason),
}

/// An outgoing QoS 1/2 publish waiting for its acknowledgement.
#[derive(Debug, Clone, Copy)]
struct OutFlight {
    token: u64,
    awaiting: Awaiting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    /// PUBACK (QoS 1).
    Ack,
    /// PUBREC (QoS 2).
    Rec,
    /// PUBCOMP (QoS 2, PUBREL sent).
    Comp,
}

/// An incoming QoS 1/2 message by packet id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inbound {
    /// Given to the owner, not yet acknowledged by it.
    WithOwner(QoS),
    /// QoS 2, PUBREC sent: waiting for PUBREL. A PUBLISH with this id again is a re-send
    /// and is not delivered again.
    Received,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// CONNECT written, CONNACK due by the deadline.
    AwaitingConnack {
        deadline: Instant,
    },
    Connected,
    Closed,
}

/// One connection's MQTT client state. See the module documentation.
pub struct ClientCore {
    version: ProtocolVersion,
    state: State,
    subscriptions: Vec<Subscription>,
    max_packet_size: usize,
    inbound_window: u16,
    /// The window in force: the owner's, capped by the remote's Receive Maximum.
    window: usize,
    remote_max_packet: usize,
    max_qos: QoS,
    retain_available: bool,
    keep_alive: Option<Duration>,
    last_sent: Instant,
    last_received: Instant,
    ping_sent: Option<Instant>,
    out: HashMap<u16, OutFlight>,
    next_id: u16,
    /// The packet id of our SUBSCRIBE while its SUBACK is due.
    subscribe_id: Option<u16>,
    inbound: HashMap<u16, Inbound>,
    wbuf: BytesMut,
    events: VecDeque<Event>,
}

impl ClientCore {
    /// A core for one new connection; CONNECT is already in its output.
    pub fn new(opts: &LinkOptions, now: Instant) -> ClientCore {
        let v5 = opts.version.is_v5();
        let keep_alive_secs = opts.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16;
        let properties = if v5 {
            Properties {
                session_expiry_interval: (opts.session_expiry > 0).then_some(opts.session_expiry),
                receive_maximum: (opts.inbound_window < u16::MAX).then_some(opts.inbound_window),
                maximum_packet_size: u32::try_from(opts.max_packet_size).ok(),
                ..Properties::default()
            }
        } else {
            Properties::default()
        };
        let connect = Connect {
            version: opts.version,
            clean_start: opts.clean_start,
            keep_alive: keep_alive_secs,
            client_id: MqttStr::from(opts.client_id.as_str()),
            will: None,
            username: opts.username.as_deref().map(MqttStr::from),
            password: opts.password.clone(),
            properties,
        };
        let mut wbuf = BytesMut::new();
        encode_connect(&mut wbuf, &connect);
        ClientCore {
            version: opts.version,
            state: State::AwaitingConnack {
                deadline: now + opts.connect_timeout,
            },
            subscriptions: opts.subscriptions.clone(),
            max_packet_size: opts.max_packet_size,
            inbound_window: opts.inbound_window.max(1),
            window: opts.window.clamp(1, u16::MAX as usize),
            remote_max_packet: usize::MAX,
            max_qos: QoS::ExactlyOnce,
            retain_available: true,
            keep_alive: (keep_alive_secs > 0).then(|| Duration::from_secs(keep_alive_secs.into())),
            last_sent: now,
            last_received: now,
            ping_sent: None,
            out: HashMap::new(),
            next_id: 1,
            subscribe_id: None,
            inbound: HashMap::new(),
            wbuf,
            events: VecDeque::new(),
        }
    }

    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// How many more publishes [`ClientCore::publish`] takes now (0 until CONNACK).
    pub fn room(&self) -> usize {
        if self.state == State::Connected {
            self.window.saturating_sub(self.out.len())
        } else {
            0
        }
    }

    /// The window in force (the owner's, capped by the remote's Receive Maximum).
    pub fn window(&self) -> usize {
        self.window
    }

    /// Bytes to write to the socket, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.wbuf.is_empty()).then(|| self.wbuf.split().freeze())
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Decodes every complete packet at the front of `buf` (what the socket gave), leaving
    /// a partial one there for the next read.
    pub fn handle_input(&mut self, buf: &mut BytesMut, now: Instant) {
        while self.state != State::Closed {
            match decode_server_packet(buf, self.version, self.max_packet_size) {
                Ok(ServerOutcome::Packet(p, _)) => {
                    self.last_received = now;
                    self.ping_sent = None;
                    if let Err(e) = self.handle_packet(p, now) {
                        self.close_with_error(e);
                    }
                }
                Ok(ServerOutcome::Incomplete) => return,
                Err(e) => self.close_with_error(e),
            }
        }
        buf.clear();
    }

    fn handle_packet(&mut self, p: ServerPacket, now: Instant) -> Result<(), ProtocolError> {
        if let State::AwaitingConnack { .. } = self.state {
            let ServerPacket::ConnAck(c) = p else {
                // [MQTT-3.2.0-1] the server's first packet is CONNACK.
                return Err(ProtocolError::Protocol(
                    "first packet from server is not CONNACK",
                ));
            };
            self.handle_connack(c, now);
            return Ok(());
        }
        match p {
            ServerPacket::ConnAck(_) => Err(ProtocolError::Protocol("second CONNACK")),
            ServerPacket::Publish(p) => self.handle_publish(p, now),
            ServerPacket::PubAck(a) => self.settle(a, Awaiting::Ack),
            ServerPacket::PubRec(a) => self.handle_pubrec(a, now),
            ServerPacket::PubComp(a) => self.settle(a, Awaiting::Comp),
            ServerPacket::PubRel(a) => self.handle_pubrel(a, now),
            ServerPacket::SubAck(s) => self.handle_suback(s),
            ServerPacket::UnsubAck(_) | ServerPacket::PingResp => Ok(()),
            ServerPacket::Disconnect(d) => {
                self.close(CloseReason::ServerDisconnect {
                    reason: d.reason,
                    reason_string: d.reason_string.map(|s| s.as_str().to_string()),
                });
                Ok(())
            }
            ServerPacket::Auth(_) => Err(ProtocolError::Protocol(
                "AUTH: the bridge does not do enhanced authentication",
            )),
        }
    }

    fn handle_connack(&mut self, c: ConnAck, now: Instant) {
        if c.reason != 0 {
            self.close(CloseReason::Refused { reason: c.reason });
            return;
        }
        let p = &c.properties;
        if let Some(rm) = p.receive_maximum {
            self.window = self.window.min(usize::from(rm));
        }
        if let Some(q) = p.maximum_qos {
            self.max_qos = QoS::from_u8(q).unwrap_or(QoS::ExactlyOnce);
        }
        self.retain_available = p.retain_available != Some(0);
        if let Some(m) = p.maximum_packet_size {
            self.remote_max_packet = usize::try_from(m).unwrap_or(usize::MAX);
        }
        if let Some(ka) = p.server_keep_alive {
            // [MQTT-3.2.2-21] the server's keep-alive replaces ours.
            self.keep_alive = (ka > 0).then(|| Duration::from_secs(ka.into()));
        }
        self.state = State::Connected;
        self.events.push_back(Event::Connected {
            session_present: c.session_present,
        });
        if !self.subscriptions.is_empty() {
            let id = self.allocate_id();
            let filters: Vec<_> = self
                .subscriptions
                .iter()
                .map(|s| {
                    (
                        MqttStr::from(s.filter.as_str()),
                        SubscriptionOptions {
                            qos: s.qos,
                            no_local: s.no_local,
                            // A bridge passes retained messages on as retained: without this
                            // the remote clears RETAIN on everything it forwards.
                            retain_as_published: true,
                            retain_handling: 0,
                        },
                    )
                })
                .collect();
            encode_subscribe(&mut self.wbuf, self.version, id, &filters);
            self.subscribe_id = Some(id);
            self.last_sent = now;
        }
    }

    fn handle_publish(&mut self, p: Publish, now: Instant) -> Result<(), ProtocolError> {
        if p.properties.topic_alias.is_some() {
            // [MQTT-3.3.2-8] we advertise no Topic Alias Maximum, so none may be used.
            return Err(ProtocolError::TopicAliasInvalid);
        }
        if !validate::is_valid_topic_name(p.topic.as_str()) {
            return Err(ProtocolError::TopicNameInvalid);
        }
        if p.qos != QoS::AtMostOnce {
            match self.inbound.get(&p.packet_id) {
                Some(Inbound::Received) => {
                    // A re-sent QoS 2 PUBLISH we already took: PUBREC again, deliver nothing.
                    encode_pub_response(&mut self.wbuf, self.version, PUBREC, p.packet_id, 0);
                    self.last_sent = now;
                    return Ok(());
                }
                // The owner has it and will acknowledge it.
                Some(Inbound::WithOwner(_)) => return Ok(()),
                None => {}
            }
            if self.inbound.len() >= usize::from(self.inbound_window) && self.version.is_v5() {
                // [MQTT-3.3.4-9] more unacknowledged QoS 1/2 than our Receive Maximum.
                return Err(ProtocolError::ReceiveMaximumExceeded);
            }
            self.inbound.insert(p.packet_id, Inbound::WithOwner(p.qos));
        }
        self.events.push_back(Event::Message(Incoming {
            packet_id: p.packet_id,
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties: p.properties,
        }));
        Ok(())
    }

    /// The owner has stored incoming message `packet_id`: PUBACK (QoS 1) or PUBREC (QoS 2)
    /// goes out. False when no message with that id waits for it (already acknowledged, or
    /// from an earlier connection: packet ids do not carry over).
    pub fn ack_incoming(&mut self, packet_id: u16, now: Instant) -> bool {
        if self.state != State::Connected {
            return false;
        }
        match self.inbound.get(&packet_id) {
            Some(Inbound::WithOwner(QoS::ExactlyOnce)) => {
                encode_pub_response(&mut self.wbuf, self.version, PUBREC, packet_id, 0);
                self.inbound.insert(packet_id, Inbound::Received);
            }
            Some(Inbound::WithOwner(_)) => {
                encode_pub_response(&mut self.wbuf, self.version, PUBACK, packet_id, 0);
                self.inbound.remove(&packet_id);
            }
            Some(Inbound::Received) | None => return false,
        }
        self.last_sent = now;
        true
    }

    fn handle_pubrel(&mut self, a: PubResponse, now: Instant) -> Result<(), ProtocolError> {
        let reason = match self.inbound.get(&a.packet_id) {
            Some(Inbound::Received) => {
                self.inbound.remove(&a.packet_id);
                0
            }
            Some(Inbound::WithOwner(_)) => {
                return Err(ProtocolError::Protocol("PUBREL before our PUBREC"));
            }
            None => ReasonCode::PacketIdentifierNotFound.as_u8(),
        };
        encode_pub_response(&mut self.wbuf, self.version, PUBCOMP, a.packet_id, reason);
        self.last_sent = now;
        Ok(())
    }

    /// PUBACK or PUBCOMP: the publish waiting for it is done.
    fn settle(&mut self, a: PubResponse, kind: Awaiting) -> Result<(), ProtocolError> {
        match self.out.get(&a.packet_id) {
            Some(f) if f.awaiting == kind => {
                let token = f.token;
                self.out.remove(&a.packet_id);
                self.events.push_back(Event::Acked {
                    token,
                    reason: a.reason,
                });
                Ok(())
            }
            Some(_) => Err(ProtocolError::Protocol(
                "acknowledgement of the wrong kind for the packet id",
            )),
            // A late duplicate: nothing waits for it.
            None => Ok(()),
        }
    }

    fn handle_pubrec(&mut self, a: PubResponse, now: Instant) -> Result<(), ProtocolError> {
        match self.out.get_mut(&a.packet_id) {
            Some(f) if f.awaiting == Awaiting::Ack => {
                Err(ProtocolError::Protocol("PUBREC for a QoS 1 publish"))
            }
            Some(f) if a.reason >= 0x80 => {
                // MQTT 5.0 §4.3.3: a refusing PUBREC ends the exchange, no PUBREL.
                let token = f.token;
                self.out.remove(&a.packet_id);
                self.events.push_back(Event::Acked {
                    token,
                    reason: a.reason,
                });
                Ok(())
            }
            Some(f) => {
                // Also on a repeated PUBREC (Comp already): PUBREL again.
                f.awaiting = Awaiting::Comp;
                encode_pub_response(&mut self.wbuf, self.version, PUBREL, a.packet_id, 0);
                self.last_sent = now;
                Ok(())
            }
            None => {
                if a.reason < 0x80 {
                    let reason = ReasonCode::PacketIdentifierNotFound.as_u8();
                    encode_pub_response(&mut self.wbuf, self.version, PUBREL, a.packet_id, reason);
                    self.last_sent = now;
                }
                Ok(())
            }
        }
    }

    fn handle_suback(&mut self, s: SubAck) -> Result<(), ProtocolError> {
        if self.subscribe_id != Some(s.packet_id) {
            return Ok(());
        }
        self.subscribe_id = None;
        if s.codes.len() != self.subscriptions.len() {
            // [MQTT-3.8.4-6] one return code per filter.
            return Err(ProtocolError::Protocol("SUBACK code count differs"));
        }
        for (sub, &code) in self.subscriptions.iter().zip(&s.codes) {
            if code >= 0x80 {
                self.events.push_back(Event::SubscribeRefused {
                    filter: sub.filter.clone(),
                    reason: code,
                });
            }
        }
        Ok(())
    }

    /// Sends one message. `dup` marks a re-send of a message an earlier connection may have
    /// delivered (the owner knows; this core does not). QoS above the remote's Maximum QoS is
    /// lowered to it ([MQTT-3.2.2-11]) and RETAIN is cleared when the remote has no retained
    /// messages ([MQTT-3.2.2-14]), so a message still goes rather than stalling the queue
    /// forever. A QoS 0 publish is acknowledged (reason 0) at once.
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        &mut self,
        token: u64,
        topic: &str,
        payload: &[u8],
        qos: QoS,
        retain: bool,
        properties: &PublishProperties,
        dup: bool,
        now: Instant,
    ) -> Result<(), PublishError> {
        if self.state != State::Connected {
            return Err(PublishError::NotConnected);
        }
        if self.room() == 0 {
            return Err(PublishError::Full);
        }
        if !validate::is_valid_topic_name(topic) || topic.len() > u16::MAX as usize {
            return Err(PublishError::TopicInvalid);
        }
        let qos = qos.min(self.max_qos);
        let mut out = OutgoingPublish {
            topic: topic.as_bytes(),
            qos,
            retain: retain && self.retain_available,
            dup: dup && qos != QoS::AtMostOnce,
            packet_id: 0,
            properties,
            extras: PublishExtras {
                message_expiry_interval: properties.message_expiry_interval,
                ..PublishExtras::default()
            },
            payload,
        };
        let size = publish_size(self.version, &out);
        if size > self.remote_max_packet {
            return Err(PublishError::TooLarge {
                size,
                max: self.remote_max_packet,
            });
        }
        if qos == QoS::AtMostOnce {
            encode_publish(&mut self.wbuf, self.version, &out);
            self.events.push_back(Event::Acked { token, reason: 0 });
        } else {
            let id = self.allocate_id();
            out.packet_id = id;
            encode_publish(&mut self.wbuf, self.version, &out);
            let awaiting = if qos == QoS::AtLeastOnce {
                Awaiting::Ack
            } else {
                Awaiting::Rec
            };
            self.out.insert(id, OutFlight { token, awaiting });
        }
        self.last_sent = now;
        Ok(())
    }

    /// The next free packet id. The window (at most 65535) plus one SUBSCRIBE never fill all
    /// 65535 ids, and `room` is checked before, so the search ends.
    fn allocate_id(&mut self) -> u16 {
        for _ in 0..=u16::MAX {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if !self.out.contains_key(&id) && self.subscribe_id != Some(id) {
                return id;
            }
        }
        // Unreachable by the bound above; an id in use is better than a panic.
        self.next_id
    }

    /// When [`ClientCore::handle_timer`] next has something to do.
    pub fn next_timer(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingConnack { deadline } => Some(deadline),
            State::Connected => {
                let ka = self.keep_alive?;
                Some(match self.ping_sent {
                    Some(t) => t + ka,
                    None => self.last_sent.min(self.last_received) + ka,
                })
            }
            State::Closed => None,
        }
    }

    /// Timers: CONNACK's deadline; PINGREQ after a keep-alive with nothing sent or nothing
    /// received (a remote that only receives would otherwise go unchecked); closing when a
    /// keep-alive passes after PINGREQ with nothing at all from the remote.
    pub fn handle_timer(&mut self, now: Instant) {
        match self.state {
            State::AwaitingConnack { deadline } if now >= deadline => {
                self.close(CloseReason::ConnackTimeout)
            }
            State::Connected => {
                let Some(ka) = self.keep_alive else { return };
                match self.ping_sent {
                    Some(t) if now >= t + ka => self.close_with(
                        CloseReason::KeepAliveTimeout,
                        ReasonCode::KeepAliveTimeout.as_u8(),
                    ),
                    Some(_) => {}
                    None => {
                        if now >= self.last_sent + ka || now >= self.last_received + ka {
                            encode_pingreq(&mut self.wbuf);
                            self.last_sent = now;
                            self.ping_sent = Some(now);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// The owner stops the link: DISCONNECT (normal) goes out, then `Closed(Shutdown)`.
    pub fn disconnect(&mut self) {
        self.close_with(CloseReason::Shutdown, 0);
    }

    /// The driver lost the connection (or the remote closed it): `Closed(reason)`.
    pub fn connection_lost(&mut self, reason: CloseReason) {
        self.close(reason);
    }

    fn close_with_error(&mut self, e: ProtocolError) {
        let code = e.reason_code().as_u8();
        self.close_with(CloseReason::Protocol(e), code);
    }

    /// Closes, sending DISCONNECT with `code` when connected (3.x: DISCONNECT has no code).
    fn close_with(&mut self, reason: CloseReason, code: u8) {
        if self.state == State::Connected {
            encode_client_disconnect(&mut self.wbuf, self.version, code);
        }
        self.close(reason);
    }

    fn close(&mut self, reason: CloseReason) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        self.events.push_back(Event::Closed(reason));
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
