//! The MQTT wire format: the only module that knows how packets look on the wire.
//!
//! Tern carries its own codec for MQTT 3.1, 3.1.1 and 5.0 rather than adapting `mqttbytes`:
//! one decoder serves all three versions (a version flag instead of two parallel type trees),
//! strings and payloads are zero-copy slices of one owned copy of the packet body (so a queued
//! message never pins a socket read buffer), and every outgoing PUBLISH is encoded straight into
//! the connection's write buffer with its per-subscriber fields (packet id, QoS, retain, topic
//! alias, subscription identifiers) without building an intermediate struct. The checks the
//! adapter would have had to bolt on (reserved flags, empty SUBSCRIBE, MQTT UTF-8, v5 DISCONNECT
//! of 0 or 1 byte, AUTH, MQIsdp, whole-packet Maximum Packet Size) live in the decoder itself,
//! each tagged with its normative statement.

mod client;
mod codec;
mod decode;
#[cfg(test)]
mod differential_tests;
mod encode;
mod error;
mod properties;
#[cfg(test)]
pub(crate) mod test_support;
pub mod validate;

pub use client::{
    connack_v3_to_v5, decode_server_packet, encode_client_disconnect, encode_connect,
    encode_pingreq, encode_subscribe, ConnAck, ServerDisconnect, ServerOutcome, ServerPacket,
    SubAck,
};
pub use codec::MqttStr;
pub use decode::{decode_packet, DecodeOutcome};
pub use encode::*;
pub use error::ProtocolError;
pub use properties::{Properties, PublishProperties};

use bytes::Bytes;

/// Protocol level from CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolVersion {
    /// MQTT 3.1, protocol name "MQIsdp", level 3.
    V3_1,
    /// MQTT 3.1.1, level 4.
    V3_1_1,
    /// MQTT 5.0, level 5.
    V5,
}

impl ProtocolVersion {
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }
    /// The protocol level byte of CONNECT: 3, 4 or 5.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V3_1 => 3,
            ProtocolVersion::V3_1_1 => 4,
            ProtocolVersion::V5 => 5,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            ProtocolVersion::V3_1 => "3.1",
            ProtocolVersion::V3_1_1 => "3.1.1",
            ProtocolVersion::V5 => "5.0",
        }
    }
}

/// Quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// MQTT 5 reason codes used by the broker. 3.1.1 return codes are derived where needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReasonCode {
    Success = 0x00,
    GrantedQoS1 = 0x01,
    GrantedQoS2 = 0x02,
    DisconnectWithWill = 0x04,
    NoMatchingSubscribers = 0x10,
    NoSubscriptionExisted = 0x11,
    UnspecifiedError = 0x80,
    MalformedPacket = 0x81,
    ProtocolError = 0x82,
    ImplementationSpecificError = 0x83,
    UnsupportedProtocolVersion = 0x84,
    ClientIdentifierNotValid = 0x85,
    BadUserNameOrPassword = 0x86,
    NotAuthorized = 0x87,
    ServerUnavailable = 0x88,
    ServerBusy = 0x89,
    ServerShuttingDown = 0x8B,
    BadAuthenticationMethod = 0x8C,
    KeepAliveTimeout = 0x8D,
    SessionTakenOver = 0x8E,
    TopicFilterInvalid = 0x8F,
    TopicNameInvalid = 0x90,
    PacketIdentifierNotFound = 0x92,
    ReceiveMaximumExceeded = 0x93,
    TopicAliasInvalid = 0x94,
    PacketTooLarge = 0x95,
    QuotaExceeded = 0x97,
    /// DISCONNECT: an operator closed the connection (the admin API's kick).
    AdministrativeAction = 0x98,
    PayloadFormatInvalid = 0x99,
    RetainNotSupported = 0x9A,
    QoSNotSupported = 0x9B,
    SharedSubscriptionsNotSupported = 0x9E,
    /// DISCONNECT: the connection's time is up; Tern sends it when the credentials it
    /// connected with (a JWT) expire.
    MaximumConnectTime = 0xA0,
}

impl ReasonCode {
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The named code for `v`, when this type has one (a peer may send codes the broker
    /// itself never uses, such as 0x9C Use Another Server).
    pub fn from_u8(v: u8) -> Option<ReasonCode> {
        Some(match v {
            0x00 => Self::Success,
            0x01 => Self::GrantedQoS1,
            0x02 => Self::GrantedQoS2,
            0x04 => Self::DisconnectWithWill,
            0x10 => Self::NoMatchingSubscribers,
            0x11 => Self::NoSubscriptionExisted,
            0x80 => Self::UnspecifiedError,
            0x81 => Self::MalformedPacket,
            0x82 => Self::ProtocolError,
            0x83 => Self::ImplementationSpecificError,
            0x84 => Self::UnsupportedProtocolVersion,
            0x85 => Self::ClientIdentifierNotValid,
            0x86 => Self::BadUserNameOrPassword,
            0x87 => Self::NotAuthorized,
            0x88 => Self::ServerUnavailable,
            0x89 => Self::ServerBusy,
            0x8B => Self::ServerShuttingDown,
            0x8C => Self::BadAuthenticationMethod,
            0x8D => Self::KeepAliveTimeout,
            0x8E => Self::SessionTakenOver,
            0x8F => Self::TopicFilterInvalid,
            0x90 => Self::TopicNameInvalid,
            0x92 => Self::PacketIdentifierNotFound,
            0x93 => Self::ReceiveMaximumExceeded,
            0x94 => Self::TopicAliasInvalid,
            0x95 => Self::PacketTooLarge,
            0x97 => Self::QuotaExceeded,
            0x98 => Self::AdministrativeAction,
            0x99 => Self::PayloadFormatInvalid,
            0x9A => Self::RetainNotSupported,
            0x9B => Self::QoSNotSupported,
            0x9E => Self::SharedSubscriptionsNotSupported,
            0xA0 => Self::MaximumConnectTime,
            _ => return None,
        })
    }

    /// A refusal (0x80 and above) rather than a success.
    pub fn is_failure(self) -> bool {
        self.as_u8() >= 0x80
    }

    /// The SUBACK code that grants `qos` (0x00, 0x01, 0x02).
    pub fn granted(qos: QoS) -> ReasonCode {
        match qos {
            QoS::AtMostOnce => ReasonCode::Success,
            QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
            QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
        }
    }

    /// The 3.1.1 CONNACK return code for a refusal ([MQTT-3.2.2-4] .. table 3.1).
    pub fn v3_connack_code(self) -> u8 {
        match self {
            ReasonCode::Success => 0,
            ReasonCode::UnsupportedProtocolVersion => 1,
            ReasonCode::ClientIdentifierNotValid => 2,
            ReasonCode::ServerUnavailable | ReasonCode::ServerBusy => 3,
            ReasonCode::BadUserNameOrPassword => 4,
            _ => 5,
        }
    }
}

/// A Will Message from CONNECT.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: MqttStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Will Delay Interval in seconds (v5).
    pub delay_interval: u32,
    pub properties: PublishProperties,
}

/// CONNECT, with v5 properties resolved to their defaults.
#[derive(Debug, Clone)]
pub struct Connect {
    pub version: ProtocolVersion,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: MqttStr,
    pub will: Option<Will>,
    pub username: Option<MqttStr>,
    pub password: Option<Bytes>,
    pub properties: Properties,
}

/// PUBLISH as received from a client.
#[derive(Debug, Clone)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: MqttStr,
    /// 0 for QoS 0.
    pub packet_id: u16,
    pub properties: PublishProperties,
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubResponse {
    pub packet_id: u16,
    pub reason: u8,
}

/// Subscription options byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            qos: QoS::AtMostOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Subscribe {
    pub packet_id: u16,
    pub subscription_identifier: Option<u32>,
    pub filters: Vec<(MqttStr, SubscriptionOptions)>,
}

#[derive(Debug, Clone)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub filters: Vec<MqttStr>,
}

#[derive(Debug, Clone)]
pub struct Disconnect {
    pub reason: u8,
    pub session_expiry_interval: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Auth {
    pub reason: u8,
    pub properties: Properties,
}

/// A packet sent by a client to the broker.
#[derive(Debug, Clone)]
pub enum Packet {
    Connect(Box<Connect>),
    Publish(Publish),
    PubAck(PubResponse),
    PubRec(PubResponse),
    PubRel(PubResponse),
    PubComp(PubResponse),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    PingReq,
    Disconnect(Disconnect),
    Auth(Box<Auth>),
}

/// Control packet types: the high nibble of the fixed header's first byte ([MQTT-2.1.2]).
pub mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNACK: u8 = 2;
    pub const PUBLISH: u8 = 3;
    pub const PUBACK: u8 = 4;
    pub const PUBREC: u8 = 5;
    pub const PUBREL: u8 = 6;
    pub const PUBCOMP: u8 = 7;
    pub const SUBSCRIBE: u8 = 8;
    pub const SUBACK: u8 = 9;
    pub const UNSUBSCRIBE: u8 = 10;
    pub const UNSUBACK: u8 = 11;
    pub const PINGREQ: u8 = 12;
    pub const PINGRESP: u8 = 13;
    pub const DISCONNECT: u8 = 14;
    pub const AUTH: u8 = 15;
}

impl Packet {
    /// The packet's type (see [`kind`]).
    pub fn kind(&self) -> u8 {
        match self {
            Packet::Connect(_) => kind::CONNECT,
            Packet::Publish(_) => kind::PUBLISH,
            Packet::PubAck(_) => kind::PUBACK,
            Packet::PubRec(_) => kind::PUBREC,
            Packet::PubRel(_) => kind::PUBREL,
            Packet::PubComp(_) => kind::PUBCOMP,
            Packet::Subscribe(_) => kind::SUBSCRIBE,
            Packet::Unsubscribe(_) => kind::UNSUBSCRIBE,
            Packet::PingReq => kind::PINGREQ,
            Packet::Disconnect(_) => kind::DISCONNECT,
            Packet::Auth(_) => kind::AUTH,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::PingReq => "PINGREQ",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}
