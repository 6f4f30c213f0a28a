//! MQTT 5 properties (section 2.2.2).
//!
//! [`PublishProperties`] is what an application message carries from publisher to subscriber
//! (kept small: it lives in every queued message). [`Properties`] holds everything else and is
//! used for CONNECT, CONNACK, DISCONNECT and AUTH, which are rare.

use super::codec::{put_binary, put_varint, varint_len, MqttStr, Reader};
use super::ProtocolError;
use bytes::{BufMut, Bytes, BytesMut};

pub(crate) mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// Which packet a property block belongs to; decides which identifiers are allowed
/// (a property in the wrong packet is a protocol error, section 2.2.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Context {
    Connect,
    Will,
    Publish,
    PubResponse,
    Subscribe,
    Unsubscribe,
    Disconnect,
    Auth,
    /// PUBLISH from a server to Tern as a client (a bridge): may carry Subscription
    /// Identifiers, which are read and dropped (the bridge never sets one).
    PublishFromServer,
    /// CONNACK, received by Tern as a client.
    ConnAck,
    /// SUBACK or UNSUBACK, received by Tern as a client.
    SubAck,
}

fn allowed(ctx: Context, pid: u8) -> bool {
    use id::*;
    match ctx {
        Context::Connect => matches!(
            pid,
            SESSION_EXPIRY_INTERVAL
                | AUTHENTICATION_METHOD
                | AUTHENTICATION_DATA
                | REQUEST_PROBLEM_INFORMATION
                | REQUEST_RESPONSE_INFORMATION
                | RECEIVE_MAXIMUM
                | TOPIC_ALIAS_MAXIMUM
                | USER_PROPERTY
                | MAXIMUM_PACKET_SIZE
        ),
        Context::Will => matches!(
            pid,
            PAYLOAD_FORMAT_INDICATOR
                | MESSAGE_EXPIRY_INTERVAL
                | CONTENT_TYPE
                | RESPONSE_TOPIC
                | CORRELATION_DATA
                | WILL_DELAY_INTERVAL
                | USER_PROPERTY
        ),
        // A client must not send a Subscription Identifier in PUBLISH [MQTT-3.3.4-6].
        Context::Publish => matches!(
            pid,
            PAYLOAD_FORMAT_INDICATOR
                | MESSAGE_EXPIRY_INTERVAL
                | CONTENT_TYPE
                | RESPONSE_TOPIC
                | CORRELATION_DATA
                | TOPIC_ALIAS
                | USER_PROPERTY
        ),
        Context::PubResponse => matches!(pid, REASON_STRING | USER_PROPERTY),
        // MQTT 5.0 §3.10.2.1: UNSUBSCRIBE carries User Properties only.
        Context::Unsubscribe => pid == USER_PROPERTY,
        Context::Subscribe => matches!(pid, SUBSCRIPTION_IDENTIFIER | USER_PROPERTY),
        Context::Disconnect => matches!(
            pid,
            SESSION_EXPIRY_INTERVAL | REASON_STRING | USER_PROPERTY | SERVER_REFERENCE
        ),
        Context::Auth => matches!(
            pid,
            AUTHENTICATION_METHOD | AUTHENTICATION_DATA | REASON_STRING | USER_PROPERTY
        ),
        Context::PublishFromServer => matches!(
            pid,
            PAYLOAD_FORMAT_INDICATOR
                | MESSAGE_EXPIRY_INTERVAL
                | CONTENT_TYPE
                | RESPONSE_TOPIC
                | CORRELATION_DATA
                | TOPIC_ALIAS
                | USER_PROPERTY
                | SUBSCRIPTION_IDENTIFIER
        ),
        // MQTT 5.0 §3.2.2.3: everything a server may tell a client about itself.
        Context::ConnAck => matches!(
            pid,
            SESSION_EXPIRY_INTERVAL
                | RECEIVE_MAXIMUM
                | MAXIMUM_QOS
                | RETAIN_AVAILABLE
                | MAXIMUM_PACKET_SIZE
                | ASSIGNED_CLIENT_IDENTIFIER
                | TOPIC_ALIAS_MAXIMUM
                | REASON_STRING
                | USER_PROPERTY
                | WILDCARD_SUBSCRIPTION_AVAILABLE
                | SUBSCRIPTION_IDENTIFIER_AVAILABLE
                | SHARED_SUBSCRIPTION_AVAILABLE
                | SERVER_KEEP_ALIVE
                | RESPONSE_INFORMATION
                | SERVER_REFERENCE
                | AUTHENTICATION_METHOD
                | AUTHENTICATION_DATA
        ),
        Context::SubAck => matches!(pid, REASON_STRING | USER_PROPERTY),
    }
}

/// Properties of an application message, passed from publisher to subscribers untouched
/// (except Message Expiry, which is rewritten to the remaining time, and the per-connection
/// Topic Alias).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProperties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<MqttStr>,
    pub response_topic: Option<MqttStr>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(MqttStr, MqttStr)>,
    /// Inbound only; never forwarded.
    pub topic_alias: Option<u16>,
    /// Will only.
    pub will_delay_interval: Option<u32>,
}

/// Every other property, for the rare packets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<MqttStr>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<MqttStr>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<MqttStr>,
    pub server_reference: Option<MqttStr>,
    pub reason_string: Option<MqttStr>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(MqttStr, MqttStr)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
    pub subscription_identifier: Option<u32>,
}

const DUPLICATE: ProtocolError = ProtocolError::Protocol("property included more than once");

fn set_once<T>(slot: &mut Option<T>, v: T) -> Result<(), ProtocolError> {
    if slot.is_some() {
        return Err(DUPLICATE);
    }
    *slot = Some(v);
    Ok(())
}

fn flag(r: &mut Reader) -> Result<u8, ProtocolError> {
    let v = r.u8()?;
    if v > 1 {
        return Err(ProtocolError::Protocol("property value must be 0 or 1"));
    }
    Ok(v)
}

/// Reads a property block (length + properties) for an application message.
pub(crate) fn read_publish_properties(
    r: &mut Reader,
    ctx: Context,
) -> Result<PublishProperties, ProtocolError> {
    let len = r.varint()? as usize;
    let mut r = r.sub(len)?;
    let mut p = PublishProperties::default();
    while r.remaining() > 0 {
        let pid = r.varint()?;
        let pid = u8::try_from(pid).map_err(|_| ProtocolError::Malformed("unknown property"))?;
        if !allowed(ctx, pid) {
            return Err(ProtocolError::Protocol(
                "property not allowed in this packet",
            ));
        }
        match pid {
            id::PAYLOAD_FORMAT_INDICATOR => {
                set_once(&mut p.payload_format_indicator, flag(&mut r)?)?
            }
            id::MESSAGE_EXPIRY_INTERVAL => set_once(&mut p.message_expiry_interval, r.u32()?)?,
            id::CONTENT_TYPE => set_once(&mut p.content_type, r.string()?)?,
            id::RESPONSE_TOPIC => {
                let t = r.string()?;
                // [MQTT-3.3.2-14] the Response Topic is a Topic Name: no wildcards.
                if !super::validate::is_valid_topic_name(t.as_str()) {
                    return Err(ProtocolError::Protocol(
                        "response topic is not a valid topic name",
                    ));
                }
                set_once(&mut p.response_topic, t)?
            }
            id::CORRELATION_DATA => set_once(&mut p.correlation_data, r.binary()?)?,
            id::USER_PROPERTY => {
                let k = r.string()?;
                let v = r.string()?;
                p.user_properties.push((k, v));
            }
            id::TOPIC_ALIAS => set_once(&mut p.topic_alias, r.u16()?)?,
            id::WILL_DELAY_INTERVAL => set_once(&mut p.will_delay_interval, r.u32()?)?,
            id::SUBSCRIPTION_IDENTIFIER => {
                // Only allowed from a server (PublishFromServer); not kept, see Context.
                if r.varint()? == 0 {
                    return Err(ProtocolError::Protocol("subscription identifier of 0"));
                }
            }
            _ => return Err(ProtocolError::Malformed("unknown property")),
        }
    }
    Ok(p)
}

/// Reads a property block for the rare packets.
pub(crate) fn read_properties(r: &mut Reader, ctx: Context) -> Result<Properties, ProtocolError> {
    let len = r.varint()? as usize;
    let mut r = r.sub(len)?;
    let mut p = Properties::default();
    while r.remaining() > 0 {
        let pid = r.varint()?;
        let pid = u8::try_from(pid).map_err(|_| ProtocolError::Malformed("unknown property"))?;
        if !allowed(ctx, pid) {
            return Err(ProtocolError::Protocol(
                "property not allowed in this packet",
            ));
        }
        match pid {
            id::SESSION_EXPIRY_INTERVAL => set_once(&mut p.session_expiry_interval, r.u32()?)?,
            id::AUTHENTICATION_METHOD => set_once(&mut p.authentication_method, r.string()?)?,
            id::AUTHENTICATION_DATA => set_once(&mut p.authentication_data, r.binary()?)?,
            id::REQUEST_PROBLEM_INFORMATION => {
                set_once(&mut p.request_problem_information, flag(&mut r)?)?
            }
            id::REQUEST_RESPONSE_INFORMATION => {
                set_once(&mut p.request_response_information, flag(&mut r)?)?
            }
            id::RECEIVE_MAXIMUM => {
                let v = r.u16()?;
                if v == 0 {
                    // MQTT 5.0 §3.1.2.11.3: a Receive Maximum of 0 is a protocol error.
                    return Err(ProtocolError::Protocol("receive maximum of 0"));
                }
                set_once(&mut p.receive_maximum, v)?
            }
            id::TOPIC_ALIAS_MAXIMUM => set_once(&mut p.topic_alias_maximum, r.u16()?)?,
            id::MAXIMUM_PACKET_SIZE => {
                let v = r.u32()?;
                if v == 0 {
                    return Err(ProtocolError::Protocol("maximum packet size of 0"));
                }
                set_once(&mut p.maximum_packet_size, v)?
            }
            id::USER_PROPERTY => {
                let k = r.string()?;
                let v = r.string()?;
                p.user_properties.push((k, v));
            }
            id::REASON_STRING => set_once(&mut p.reason_string, r.string()?)?,
            id::SERVER_REFERENCE => set_once(&mut p.server_reference, r.string()?)?,
            id::SUBSCRIPTION_IDENTIFIER => {
                let v = r.varint()?;
                if v == 0 {
                    // MQTT 5.0 §3.8.2.1.2: a Subscription Identifier of 0 is a protocol error.
                    return Err(ProtocolError::Protocol("subscription identifier of 0"));
                }
                set_once(&mut p.subscription_identifier, v)?
            }
            // The CONNACK-only properties, read when Tern is the client (Context::ConnAck).
            id::ASSIGNED_CLIENT_IDENTIFIER => {
                set_once(&mut p.assigned_client_identifier, r.string()?)?
            }
            id::SERVER_KEEP_ALIVE => set_once(&mut p.server_keep_alive, r.u16()?)?,
            id::RESPONSE_INFORMATION => set_once(&mut p.response_information, r.string()?)?,
            // MQTT 5.0 §3.2.2.3.4: Maximum QoS is 0 or 1 (absent means 2).
            id::MAXIMUM_QOS => set_once(&mut p.maximum_qos, flag(&mut r)?)?,
            id::RETAIN_AVAILABLE => set_once(&mut p.retain_available, flag(&mut r)?)?,
            id::WILDCARD_SUBSCRIPTION_AVAILABLE => {
                set_once(&mut p.wildcard_subscription_available, flag(&mut r)?)?
            }
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                set_once(&mut p.subscription_identifier_available, flag(&mut r)?)?
            }
            id::SHARED_SUBSCRIPTION_AVAILABLE => {
                set_once(&mut p.shared_subscription_available, flag(&mut r)?)?
            }
            _ => return Err(ProtocolError::Malformed("unknown property")),
        }
    }
    Ok(p)
}

fn str_prop_len(s: &Option<MqttStr>) -> usize {
    s.as_ref().map_or(0, |s| 3 + s.len())
}

fn user_props_len(u: &[(MqttStr, MqttStr)]) -> usize {
    u.iter().map(|(k, v)| 5 + k.len() + v.len()).sum()
}

fn put_str_prop(buf: &mut BytesMut, pid: u8, s: &Option<MqttStr>) {
    if let Some(s) = s {
        buf.put_u8(pid);
        put_binary(buf, s.as_bytes());
    }
}

fn put_user_props(buf: &mut BytesMut, u: &[(MqttStr, MqttStr)]) {
    for (k, v) in u {
        buf.put_u8(id::USER_PROPERTY);
        put_binary(buf, k.as_bytes());
        put_binary(buf, v.as_bytes());
    }
}

/// What a PUBLISH to one subscriber carries besides the message's own properties.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishExtras<'a> {
    pub message_expiry_interval: Option<u32>,
    pub topic_alias: Option<u16>,
    pub subscription_identifiers: &'a [u32],
}

/// Length of the property block (without its own length prefix) of an outgoing PUBLISH.
pub(crate) fn publish_properties_len(p: &PublishProperties, x: &PublishExtras<'_>) -> usize {
    p.payload_format_indicator.map_or(0, |_| 2)
        + x.message_expiry_interval.map_or(0, |_| 5)
        + str_prop_len(&p.content_type)
        + str_prop_len(&p.response_topic)
        + p.correlation_data.as_ref().map_or(0, |d| 3 + d.len())
        + user_props_len(&p.user_properties)
        + x.topic_alias.map_or(0, |_| 3)
        + x.subscription_identifiers
            .iter()
            .map(|&s| 1 + varint_len(s as usize))
            .sum::<usize>()
}

pub(crate) fn put_publish_properties(
    buf: &mut BytesMut,
    p: &PublishProperties,
    x: &PublishExtras<'_>,
    len: usize,
) {
    put_varint(buf, len);
    if let Some(v) = p.payload_format_indicator {
        buf.put_u8(id::PAYLOAD_FORMAT_INDICATOR);
        buf.put_u8(v);
    }
    if let Some(v) = x.message_expiry_interval {
        buf.put_u8(id::MESSAGE_EXPIRY_INTERVAL);
        buf.put_u32(v);
    }
    put_str_prop(buf, id::CONTENT_TYPE, &p.content_type);
    put_str_prop(buf, id::RESPONSE_TOPIC, &p.response_topic);
    if let Some(d) = &p.correlation_data {
        buf.put_u8(id::CORRELATION_DATA);
        put_binary(buf, d);
    }
    put_user_props(buf, &p.user_properties);
    if let Some(a) = x.topic_alias {
        buf.put_u8(id::TOPIC_ALIAS);
        buf.put_u16(a);
    }
    for &s in x.subscription_identifiers {
        buf.put_u8(id::SUBSCRIPTION_IDENTIFIER);
        put_varint(buf, s as usize);
    }
}

impl Properties {
    /// Length of the property block without its length prefix.
    pub(crate) fn encoded_len(&self) -> usize {
        let u32p = |v: &Option<u32>| v.map_or(0, |_| 5);
        let u16p = |v: &Option<u16>| v.map_or(0, |_| 3);
        let u8p = |v: &Option<u8>| v.map_or(0, |_| 2);
        u32p(&self.session_expiry_interval)
            + str_prop_len(&self.assigned_client_identifier)
            + u16p(&self.server_keep_alive)
            + str_prop_len(&self.authentication_method)
            + self.authentication_data.as_ref().map_or(0, |d| 3 + d.len())
            + u8p(&self.request_problem_information)
            + u8p(&self.request_response_information)
            + str_prop_len(&self.response_information)
            + str_prop_len(&self.server_reference)
            + str_prop_len(&self.reason_string)
            + u16p(&self.receive_maximum)
            + u16p(&self.topic_alias_maximum)
            + u8p(&self.maximum_qos)
            + u8p(&self.retain_available)
            + user_props_len(&self.user_properties)
            + u32p(&self.maximum_packet_size)
            + u8p(&self.wildcard_subscription_available)
            + u8p(&self.subscription_identifier_available)
            + u8p(&self.shared_subscription_available)
            + self
                .subscription_identifier
                .map_or(0, |s| 1 + varint_len(s as usize))
    }

    pub(crate) fn put(&self, buf: &mut BytesMut) {
        put_varint(buf, self.encoded_len());
        let put_u32 = |buf: &mut BytesMut, pid: u8, v: Option<u32>| {
            if let Some(v) = v {
                buf.put_u8(pid);
                buf.put_u32(v);
            }
        };
        let put_u16 = |buf: &mut BytesMut, pid: u8, v: Option<u16>| {
            if let Some(v) = v {
                buf.put_u8(pid);
                buf.put_u16(v);
            }
        };
        let put_u8 = |buf: &mut BytesMut, pid: u8, v: Option<u8>| {
            if let Some(v) = v {
                buf.put_u8(pid);
                buf.put_u8(v);
            }
        };
        put_u32(
            buf,
            id::SESSION_EXPIRY_INTERVAL,
            self.session_expiry_interval,
        );
        put_str_prop(
            buf,
            id::ASSIGNED_CLIENT_IDENTIFIER,
            &self.assigned_client_identifier,
        );
        put_u16(buf, id::SERVER_KEEP_ALIVE, self.server_keep_alive);
        put_str_prop(buf, id::AUTHENTICATION_METHOD, &self.authentication_method);
        if let Some(d) = &self.authentication_data {
            buf.put_u8(id::AUTHENTICATION_DATA);
            put_binary(buf, d);
        }
        put_u8(
            buf,
            id::REQUEST_PROBLEM_INFORMATION,
            self.request_problem_information,
        );
        put_u8(
            buf,
            id::REQUEST_RESPONSE_INFORMATION,
            self.request_response_information,
        );
        put_str_prop(buf, id::RESPONSE_INFORMATION, &self.response_information);
        put_str_prop(buf, id::SERVER_REFERENCE, &self.server_reference);
        put_str_prop(buf, id::REASON_STRING, &self.reason_string);
        put_u16(buf, id::RECEIVE_MAXIMUM, self.receive_maximum);
        put_u16(buf, id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        put_u8(buf, id::MAXIMUM_QOS, self.maximum_qos);
        put_u8(buf, id::RETAIN_AVAILABLE, self.retain_available);
        put_user_props(buf, &self.user_properties);
        put_u32(buf, id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        put_u8(
            buf,
            id::WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available,
        );
        put_u8(
            buf,
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifier_available,
        );
        put_u8(
            buf,
            id::SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available,
        );
        if let Some(s) = self.subscription_identifier {
            buf.put_u8(id::SUBSCRIPTION_IDENTIFIER);
            put_varint(buf, s as usize);
        }
    }
}
