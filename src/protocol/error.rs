//! The protocol error and the ONE mapping from it to the MQTT 5 reason code that closes the
//! connection (errors that stop the broker from starting are `StartError`, with startup in
//! `lib.rs`). Every place that decides to drop a client goes through [`ProtocolError`], so
//! the reason a v5 client sees and the line an operator reads always agree.

use crate::protocol::ReasonCode;

/// Why a client connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The bytes do not form a valid packet ([MQTT-1.5.4-1], [MQTT-2.1.3-1], ...).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// A well-formed packet that the protocol does not allow here ([MQTT-3.1.0-2], ...).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A packet larger than the Maximum Packet Size we advertised.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    /// A PUBLISH topic name that is not valid ([MQTT-3.3.2-2]).
    #[error("invalid topic name")]
    TopicNameInvalid,
    /// More unacknowledged QoS 1/2 PUBLISHes than our Receive Maximum ([MQTT-3.3.4-9]).
    #[error("receive maximum exceeded")]
    ReceiveMaximumExceeded,
    /// Topic alias 0 or above our Topic Alias Maximum ([MQTT-3.3.2-9]).
    #[error("invalid topic alias")]
    TopicAliasInvalid,
    /// CONNECT with a protocol level we do not speak ([MQTT-3.1.2-2]).
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolVersion(u8),
    /// PUBLISH with a QoS above the advertised Maximum QoS ([MQTT-3.2.2-11]).
    #[error("QoS not supported")]
    QosNotSupported,
    /// PUBLISH with RETAIN while Retain Available is 0 ([MQTT-3.2.2-14]).
    #[error("retain not supported")]
    RetainNotSupported,
    /// A 3.1.1 client with more QoS 2 ids awaiting PUBREL than `limits.max_inbound_qos2`.
    #[error("too many QoS 2 messages awaiting PUBREL")]
    Qos2Quota,
}

impl ProtocolError {
    /// The reason code sent in a v5 DISCONNECT before closing.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            ProtocolError::Malformed(_) => ReasonCode::MalformedPacket,
            ProtocolError::Protocol(_) => ReasonCode::ProtocolError,
            ProtocolError::TooLarge { .. } => ReasonCode::PacketTooLarge,
            ProtocolError::TopicNameInvalid => ReasonCode::TopicNameInvalid,
            ProtocolError::ReceiveMaximumExceeded => ReasonCode::ReceiveMaximumExceeded,
            ProtocolError::TopicAliasInvalid => ReasonCode::TopicAliasInvalid,
            ProtocolError::Qos2Quota => ReasonCode::QuotaExceeded,
            ProtocolError::QosNotSupported => ReasonCode::QoSNotSupported,
            ProtocolError::RetainNotSupported => ReasonCode::RetainNotSupported,
            ProtocolError::UnsupportedProtocolVersion(_) => ReasonCode::UnsupportedProtocolVersion,
        }
    }
}
