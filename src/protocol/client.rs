//! The client role: what Tern sends and receives when it connects out to another broker (a
//! bridge, `src/bridge/`).
//!
//! Kept apart from `decode.rs` and `encode.rs`, which are the broker's side, so that the
//! broker's decoder keeps refusing every server-only packet ([MQTT-3.1.0-1] and the "packet type
//! not allowed from a client" arm) and its hot paths gain no branch for a role most
//! connections never take. What both roles share is reused, not copied: the fixed header,
//! PUBLISH and the four acknowledgements are decoded by the same functions, with the
//! property context saying who sent them, and PUBLISH and the acknowledgements are encoded by
//! `encode_publish` and `encode_pub_response`.

use super::codec::{put_binary, put_varint, varint_len, Reader};
use super::decode::{decode_pub_response, decode_publish, expect_flags, fixed_header};
use super::properties::{read_properties, Context};
use super::*;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// CONNACK as received by a client.
#[derive(Debug, Clone)]
pub struct ConnAck {
    pub session_present: bool,
    /// The v5 reason code; a 3.x return code is mapped to its v5 equivalent
    /// ([`connack_v3_to_v5`]).
    pub reason: u8,
    pub properties: Properties,
}

/// SUBACK as received by a client: one code per filter, in the order subscribed.
#[derive(Debug, Clone)]
pub struct SubAck {
    pub packet_id: u16,
    pub codes: Vec<u8>,
}

/// DISCONNECT from a server (v5 only; a 3.x server just closes the connection).
#[derive(Debug, Clone)]
pub struct ServerDisconnect {
    pub reason: u8,
    pub reason_string: Option<MqttStr>,
}

/// A packet sent by a server to a client.
#[derive(Debug, Clone)]
pub enum ServerPacket {
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubResponse),
    PubRec(PubResponse),
    PubRel(PubResponse),
    PubComp(PubResponse),
    SubAck(SubAck),
    UnsubAck(u16),
    PingResp,
    Disconnect(ServerDisconnect),
    /// AUTH (v5): the bridge does not do enhanced authentication, so it only closes on it.
    Auth(u8),
}

impl ServerPacket {
    pub fn name(&self) -> &'static str {
        match self {
            ServerPacket::ConnAck(_) => "CONNACK",
            ServerPacket::Publish(_) => "PUBLISH",
            ServerPacket::PubAck(_) => "PUBACK",
            ServerPacket::PubRec(_) => "PUBREC",
            ServerPacket::PubRel(_) => "PUBREL",
            ServerPacket::PubComp(_) => "PUBCOMP",
            ServerPacket::SubAck(_) => "SUBACK",
            ServerPacket::UnsubAck(_) => "UNSUBACK",
            ServerPacket::PingResp => "PINGRESP",
            ServerPacket::Disconnect(_) => "DISCONNECT",
            ServerPacket::Auth(_) => "AUTH",
        }
    }
}

/// Result of trying to decode one server packet from the front of a buffer.
#[derive(Debug)]
// As `DecodeOutcome`: returned by value and consumed at once.
#[allow(clippy::large_enum_variant)]
pub enum ServerOutcome {
    /// A packet and its size on the wire.
    Packet(ServerPacket, usize),
    /// More bytes are needed.
    Incomplete,
}

/// The v5 reason code for a 3.1.1 CONNACK return code (3.1.1 table 3.1 against 5.0 §3.2.2.2).
pub fn connack_v3_to_v5(code: u8) -> u8 {
    match code {
        0 => ReasonCode::Success.as_u8(),
        1 => ReasonCode::UnsupportedProtocolVersion.as_u8(),
        2 => ReasonCode::ClientIdentifierNotValid.as_u8(),
        3 => ReasonCode::ServerUnavailable.as_u8(),
        4 => ReasonCode::BadUserNameOrPassword.as_u8(),
        5 => ReasonCode::NotAuthorized.as_u8(),
        _ => ReasonCode::UnspecifiedError.as_u8(),
    }
}

/// Decodes one packet a server sent from the front of `buf`, consuming it. The first packet
/// must be CONNACK ([MQTT-3.2.0-1]); the caller checks that, since only it knows.
pub fn decode_server_packet(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<ServerOutcome, ProtocolError> {
    let Some((first, remaining, header_len)) = fixed_header(buf)? else {
        return Ok(ServerOutcome::Incomplete);
    };
    let total = header_len + remaining;
    if total > max_packet_size {
        return Err(ProtocolError::TooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        return Ok(ServerOutcome::Incomplete);
    }
    let body = Bytes::copy_from_slice(&buf[header_len..total]);
    buf.advance(total);
    let packet = decode_server_body(first, body, version)?;
    Ok(ServerOutcome::Packet(packet, total))
}

fn decode_server_body(
    first: u8,
    body: Bytes,
    version: ProtocolVersion,
) -> Result<ServerPacket, ProtocolError> {
    let v5 = version.is_v5();
    let mut r = Reader::new(body);
    let packet = match first >> 4 {
        kind::CONNACK => {
            expect_flags(first, 0)?;
            ServerPacket::ConnAck(decode_connack(&mut r, version)?)
        }
        kind::PUBLISH => ServerPacket::Publish(decode_publish(
            first,
            &mut r,
            v5,
            Context::PublishFromServer,
        )?),
        kind::PUBACK => {
            expect_flags(first, 0)?;
            ServerPacket::PubAck(decode_pub_response(&mut r, v5)?)
        }
        kind::PUBREC => {
            expect_flags(first, 0)?;
            ServerPacket::PubRec(decode_pub_response(&mut r, v5)?)
        }
        kind::PUBREL => {
            // [MQTT-3.6.1-1]
            expect_flags(first, 0b0010)?;
            ServerPacket::PubRel(decode_pub_response(&mut r, v5)?)
        }
        kind::PUBCOMP => {
            expect_flags(first, 0)?;
            ServerPacket::PubComp(decode_pub_response(&mut r, v5)?)
        }
        kind::SUBACK => {
            expect_flags(first, 0)?;
            let packet_id = r.u16()?;
            if v5 {
                read_properties(&mut r, Context::SubAck)?;
            }
            let codes = r.rest().to_vec();
            if codes.is_empty() {
                // [MQTT-3.9.3-1] one code per filter, and SUBSCRIBE has at least one.
                return Err(ProtocolError::Protocol("SUBACK without return codes"));
            }
            ServerPacket::SubAck(SubAck { packet_id, codes })
        }
        kind::UNSUBACK => {
            expect_flags(first, 0)?;
            let packet_id = r.u16()?;
            if v5 {
                read_properties(&mut r, Context::SubAck)?;
                r.rest();
            }
            ServerPacket::UnsubAck(packet_id)
        }
        kind::PINGRESP => {
            expect_flags(first, 0)?;
            ServerPacket::PingResp
        }
        kind::DISCONNECT if v5 => {
            expect_flags(first, 0)?;
            let reason = if r.remaining() == 0 { 0 } else { r.u8()? };
            let reason_string = if r.remaining() == 0 {
                None
            } else {
                read_properties(&mut r, Context::Disconnect)?.reason_string
            };
            ServerPacket::Disconnect(ServerDisconnect {
                reason,
                reason_string,
            })
        }
        kind::AUTH if v5 => {
            expect_flags(first, 0)?;
            let reason = if r.remaining() == 0 { 0 } else { r.u8()? };
            r.rest();
            ServerPacket::Auth(reason)
        }
        0 => return Err(ProtocolError::Malformed("reserved packet type 0")),
        _ => {
            return Err(ProtocolError::Protocol(
                "packet type not allowed from a server",
            ))
        }
    };
    if r.remaining() != 0 {
        return Err(ProtocolError::Malformed("trailing bytes after packet"));
    }
    Ok(packet)
}

fn decode_connack(r: &mut Reader, version: ProtocolVersion) -> Result<ConnAck, ProtocolError> {
    let flags = r.u8()?;
    if flags & 0xfe != 0 {
        // [MQTT-3.2.2-1] bits 7-1 of the Connect Acknowledge Flags are reserved.
        return Err(ProtocolError::Malformed("CONNACK reserved flags set"));
    }
    let code = r.u8()?;
    let (reason, properties) = if version.is_v5() {
        let props = if r.remaining() == 0 {
            Properties::default()
        } else {
            read_properties(r, Context::ConnAck)?
        };
        (code, props)
    } else {
        (connack_v3_to_v5(code), Properties::default())
    };
    let session_present = flags & 0x01 != 0;
    if session_present && reason != 0 {
        // [MQTT-3.2.2-6] (5.0: [MQTT-3.2.2-6] too) a refusal has Session Present 0.
        return Err(ProtocolError::Protocol(
            "CONNACK refuses with session present set",
        ));
    }
    Ok(ConnAck {
        session_present,
        reason,
        properties,
    })
}

fn put_header(buf: &mut BytesMut, first: u8, remaining: usize) {
    buf.reserve(1 + varint_len(remaining) + remaining);
    buf.put_u8(first);
    put_varint(buf, remaining);
}

/// CONNECT from `c`: protocol name and level from `c.version` (3.1 is "MQIsdp" level 3),
/// v5 properties from `c.properties` (only those allowed in CONNECT are meaningful), the will
/// when there is one.
pub fn encode_connect(buf: &mut BytesMut, c: &Connect) {
    let (name, level): (&[u8], u8) = match c.version {
        ProtocolVersion::V3_1 => (b"MQIsdp", 3),
        ProtocolVersion::V3_1_1 => (b"MQTT", 4),
        ProtocolVersion::V5 => (b"MQTT", 5),
    };
    let v5 = c.version.is_v5();
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | (w.qos.as_u8() << 3);
        if w.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    let props_len = c.properties.encoded_len();
    let will_props = c.will.as_ref().map(|w| {
        let extras = PublishExtras {
            message_expiry_interval: w.properties.message_expiry_interval,
            ..PublishExtras::default()
        };
        let props = PublishProperties {
            will_delay_interval: (w.delay_interval > 0).then_some(w.delay_interval),
            topic_alias: None,
            ..w.properties.clone()
        };
        let len = super::properties::publish_properties_len(&props, &extras)
            + props.will_delay_interval.map_or(0, |_| 5);
        (props, extras, len)
    });
    let mut remaining = 2 + name.len() + 1 + 1 + 2 + 2 + c.client_id.len();
    if v5 {
        remaining += varint_len(props_len) + props_len;
    }
    if let Some(w) = &c.will {
        if let Some((_, _, wlen)) = &will_props {
            if v5 {
                remaining += varint_len(*wlen) + wlen;
            }
        }
        remaining += 2 + w.topic.len() + 2 + w.payload.len();
    }
    if let Some(u) = &c.username {
        remaining += 2 + u.len();
    }
    if let Some(p) = &c.password {
        remaining += 2 + p.len();
    }
    put_header(buf, 0x10, remaining);
    put_binary(buf, name);
    buf.put_u8(level);
    buf.put_u8(flags);
    buf.put_u16(c.keep_alive);
    if v5 {
        c.properties.put(buf);
    }
    put_binary(buf, c.client_id.as_bytes());
    if let Some(w) = &c.will {
        if let Some((props, extras, wlen)) = &will_props {
            if v5 {
                super::properties::put_publish_properties(buf, props, extras, *wlen);
                if let Some(d) = props.will_delay_interval {
                    buf.put_u8(super::properties::id::WILL_DELAY_INTERVAL);
                    buf.put_u32(d);
                }
            }
        }
        put_binary(buf, w.topic.as_bytes());
        put_binary(buf, &w.payload);
    }
    if let Some(u) = &c.username {
        put_binary(buf, u.as_bytes());
    }
    if let Some(p) = &c.password {
        put_binary(buf, p);
    }
}

/// SUBSCRIBE with one options byte per filter (v5: No Local, Retain As Published, Retain
/// Handling; 3.x: the QoS only, [MQTT-3.8.3-4]). No properties.
pub fn encode_subscribe(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    packet_id: u16,
    filters: &[(MqttStr, SubscriptionOptions)],
) {
    let v5 = version.is_v5();
    let mut remaining = 2 + filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
    if v5 {
        remaining += 1;
    }
    // [MQTT-3.8.1-1] SUBSCRIBE's fixed header flags are 0010.
    put_header(buf, 0x82, remaining);
    buf.put_u16(packet_id);
    if v5 {
        buf.put_u8(0);
    }
    for (f, o) in filters {
        put_binary(buf, f.as_bytes());
        let mut byte = o.qos.as_u8();
        if v5 {
            byte |= u8::from(o.no_local) << 2
                | u8::from(o.retain_as_published) << 3
                | (o.retain_handling & 0x03) << 4;
        }
        buf.put_u8(byte);
    }
}

pub fn encode_pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[0xc0, 0x00]);
}

/// DISCONNECT from a client: 3.x has no body. v5 always carries the reason byte and an empty
/// property block: the shorter forms are valid (MQTT 5.0 §3.14.2.1) but some brokers'
/// decoders refuse them (`mqttbytes` 0.6 does), and a bridge talks to brokers it does not
/// choose.
pub fn encode_client_disconnect(buf: &mut BytesMut, version: ProtocolVersion, reason: u8) {
    if version.is_v5() {
        buf.put_slice(&[0xe0, 0x02, reason, 0x00]);
    } else {
        buf.put_slice(&[0xe0, 0x00]);
    }
}

#[cfg(test)]
mod tests {
    //! Each encoder is read back by `mqttbytes` (the peer codec) and each decoder reads what
    //! `mqttbytes` writes as a broker, for 3.1.1 and 5.0.
    use super::*;
    use mqttbytes::{v4, v5};

    fn connect(version: ProtocolVersion) -> Connect {
        Connect {
            version,
            clean_start: false,
            keep_alive: 30,
            client_id: MqttStr::from("bridge-1"),
            will: None,
            username: Some(MqttStr::from("user")),
            password: Some(Bytes::from_static(b"secret")),
            properties: Properties {
                session_expiry_interval: Some(3600),
                receive_maximum: Some(20),
                maximum_packet_size: Some(65536),
                ..Properties::default()
            },
        }
    }

    #[test]
    fn connect_v311_reads_back_in_mqttbytes() {
        let mut b = BytesMut::new();
        encode_connect(&mut b, &connect(ProtocolVersion::V3_1_1));
        let v4::Packet::Connect(c) = v4::read(&mut b, 1 << 20).unwrap() else {
            panic!()
        };
        assert!(b.is_empty());
        assert_eq!(c.client_id, "bridge-1");
        assert_eq!(c.keep_alive, 30);
        assert!(!c.clean_session);
        let login = c.login.unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("user", "secret")
        );
    }

    #[test]
    fn connect_v5_reads_back_in_mqttbytes_and_tern() {
        let mut b = BytesMut::new();
        let mut c = connect(ProtocolVersion::V5);
        c.will = Some(Will {
            topic: MqttStr::from("bridge/status"),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            delay_interval: 5,
            properties: PublishProperties {
                message_expiry_interval: Some(60),
                ..PublishProperties::default()
            },
        });
        encode_connect(&mut b, &c);
        let mut ours = b.clone();
        let v5::Packet::Connect(m) = v5::read(&mut b, 1 << 20).unwrap() else {
            panic!()
        };
        assert!(b.is_empty());
        assert_eq!(m.client_id, "bridge-1");
        let p = m.properties.unwrap();
        assert_eq!(p.session_expiry_interval, Some(3600));
        assert_eq!(p.receive_maximum, Some(20));
        assert_eq!(p.max_packet_size, Some(65536));
        let w = m.last_will.unwrap();
        assert_eq!(w.topic, "bridge/status");
        assert!(w.retain);
        let DecodeOutcome::Packet(Packet::Connect(t), _) =
            decode_packet(&mut ours, None, 1 << 20).unwrap()
        else {
            panic!()
        };
        let tw = t.will.unwrap();
        assert_eq!(tw.delay_interval, 5);
        assert_eq!(tw.properties.message_expiry_interval, Some(60));
        assert_eq!(t.password.as_deref(), Some(&b"secret"[..]));
    }

    #[test]
    fn subscribe_options_read_back_in_mqttbytes() {
        let filters = [
            (
                MqttStr::from("a/+"),
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 0,
                },
            ),
            (
                MqttStr::from("b/#"),
                SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    ..SubscriptionOptions::default()
                },
            ),
        ];
        let mut b = BytesMut::new();
        encode_subscribe(&mut b, ProtocolVersion::V5, 9, &filters);
        let v5::Packet::Subscribe(s) = v5::read(&mut b, 1 << 20).unwrap() else {
            panic!()
        };
        assert_eq!(s.pkid, 9);
        assert_eq!(s.filters[0].path, "a/+");
        assert!(s.filters[0].nolocal);
        assert!(s.filters[0].preserve_retain);
        assert!(!s.filters[1].nolocal);
        assert_eq!(s.filters[1].qos, mqttbytes::QoS::ExactlyOnce);
        b.clear();
        encode_subscribe(&mut b, ProtocolVersion::V3_1_1, 10, &filters);
        let v4::Packet::Subscribe(s) = v4::read(&mut b, 1 << 20).unwrap() else {
            panic!()
        };
        assert_eq!(s.pkid, 10);
        assert_eq!(s.filters.len(), 2);
        assert_eq!(s.filters[0].qos, mqttbytes::QoS::AtLeastOnce);
    }

    #[test]
    fn pingreq_and_disconnect() {
        let mut b = BytesMut::new();
        encode_pingreq(&mut b);
        assert!(matches!(v4::read(&mut b, 10).unwrap(), v4::Packet::PingReq));
        encode_client_disconnect(&mut b, ProtocolVersion::V5, 0);
        assert!(matches!(
            v5::read(&mut b, 10).unwrap(),
            v5::Packet::Disconnect(_)
        ));
        encode_client_disconnect(&mut b, ProtocolVersion::V5, 0x04);
        let v5::Packet::Disconnect(d) = v5::read(&mut b, 10).unwrap() else {
            panic!()
        };
        assert_eq!(
            d.reason_code,
            v5::DisconnectReasonCode::DisconnectWithWillMessage
        );
    }

    fn server(buf: &mut BytesMut, version: ProtocolVersion) -> ServerPacket {
        match decode_server_packet(buf, version, 1 << 20).unwrap() {
            ServerOutcome::Packet(p, _) => p,
            ServerOutcome::Incomplete => panic!("incomplete"),
        }
    }

    #[test]
    fn connack_from_mqttbytes() {
        let mut b = BytesMut::new();
        v4::ConnAck::new(v4::ConnectReturnCode::BadUserNamePassword, false)
            .write(&mut b)
            .unwrap();
        let ServerPacket::ConnAck(c) = server(&mut b, ProtocolVersion::V3_1_1) else {
            panic!()
        };
        assert_eq!(c.reason, ReasonCode::BadUserNameOrPassword.as_u8());
        let mut ack = v5::ConnAck::new(v5::ConnectReturnCode::Success, true);
        let mut props = v5::ConnAckProperties::new();
        props.receive_max = Some(7);
        props.max_qos = Some(1);
        props.max_packet_size = Some(1000);
        props.retain_available = Some(0);
        props.assigned_client_identifier = Some("x".into());
        ack.properties = Some(props);
        ack.write(&mut b).unwrap();
        let ServerPacket::ConnAck(c) = server(&mut b, ProtocolVersion::V5) else {
            panic!()
        };
        assert!(c.session_present);
        assert_eq!(c.properties.receive_maximum, Some(7));
        assert_eq!(c.properties.maximum_qos, Some(1));
        assert_eq!(c.properties.maximum_packet_size, Some(1000));
        assert_eq!(c.properties.retain_available, Some(0));
    }

    #[test]
    fn suback_and_acks_from_mqttbytes() {
        let mut b = BytesMut::new();
        v4::SubAck::new(
            3,
            vec![
                v4::SubscribeReasonCode::Success(mqttbytes::QoS::AtLeastOnce),
                v4::SubscribeReasonCode::Failure,
            ],
        )
        .write(&mut b)
        .unwrap();
        let ServerPacket::SubAck(s) = server(&mut b, ProtocolVersion::V3_1_1) else {
            panic!()
        };
        assert_eq!((s.packet_id, &s.codes[..]), (3, &[1u8, 0x80][..]));
        v5::SubAck::new(4, vec![v5::SubscribeReasonCode::NotAuthorized])
            .write(&mut b)
            .unwrap();
        let ServerPacket::SubAck(s) = server(&mut b, ProtocolVersion::V5) else {
            panic!()
        };
        assert_eq!(s.codes, vec![0x87]);
        v5::PubRel::new(5).write(&mut b).unwrap();
        assert!(matches!(
            server(&mut b, ProtocolVersion::V5),
            ServerPacket::PubRel(PubResponse { packet_id: 5, .. })
        ));
        v4::PingResp.write(&mut b).unwrap();
        assert!(matches!(
            server(&mut b, ProtocolVersion::V3_1_1),
            ServerPacket::PingResp
        ));
    }

    #[test]
    fn server_only_and_client_only_packets() {
        // A PINGREQ from a server is not allowed; a 3.1.1 server has no DISCONNECT.
        let mut b = BytesMut::from(&[0xc0u8, 0x00][..]);
        assert!(decode_server_packet(&mut b, ProtocolVersion::V5, 100).is_err());
        let mut b = BytesMut::from(&[0xe0u8, 0x00][..]);
        assert!(decode_server_packet(&mut b, ProtocolVersion::V3_1_1, 100).is_err());
        let mut b = BytesMut::from(&[0xe0u8, 0x01, 0x8b][..]);
        let ServerPacket::Disconnect(d) = server(&mut b, ProtocolVersion::V5) else {
            panic!()
        };
        assert_eq!(d.reason, 0x8b);
    }
}
