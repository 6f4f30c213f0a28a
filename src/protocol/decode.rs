//! Decoding of the packets a client sends (MQTT 3.1, 3.1.1 and 5.0).
//!
//! The fixed header is checked first: reserved flags ([MQTT-2.1.3-1]), the remaining length
//! encoding ([MQTT-1.5.5-1]) and the whole-packet size against our Maximum Packet Size
//! ([MQTT-3.2.2-15] in v5 terms) before a single byte of the body is buffered, so an
//! oversized packet is refused without reading it. The body is then copied once out of the
//! socket buffer and every string and payload is a slice of that copy.

use super::codec::Reader;
use super::properties::{read_properties, read_publish_properties, Context};
use super::ProtocolError;
use super::*;
use bytes::{Buf, Bytes, BytesMut};

/// Result of trying to decode one packet from the front of a buffer.
#[derive(Debug)]
// Returned by value and consumed at once, never stored: boxing the packet would cost an
// allocation per packet for nothing.
#[allow(clippy::large_enum_variant)]
pub enum DecodeOutcome {
    /// A packet and its size on the wire.
    Packet(Packet, usize),
    /// More bytes are needed; the number is the full packet size when the header is known.
    Incomplete(Option<usize>),
}

/// Parses the fixed header: (type+flags byte, remaining length, header length), or None when
/// the header itself is not complete yet.
pub(super) fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, ProtocolError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            // [MQTT-1.5.5-1] the shortest form: a last byte of 0 after a continuation byte
            // adds nothing (3.1.1's algorithm in 2.2.3 never writes one either).
            if b == 0 && i > 0 {
                return Err(ProtocolError::Malformed(
                    "remaining length not in its shortest form",
                ));
            }
            return Ok(Some((first, len, 2 + i)));
        }
    }
    Err(ProtocolError::Malformed(
        "remaining length longer than 4 bytes",
    ))
}

/// Decodes one packet from the front of `buf`, consuming it. `version` is None until CONNECT
/// has been accepted; then only CONNECT may be decoded ([MQTT-3.1.0-1]).
pub fn decode_packet(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
) -> Result<DecodeOutcome, ProtocolError> {
    if version.is_none() && buf.first().is_some_and(|b| b >> 4 != 1) {
        // [MQTT-3.1.0-1] refuse at the first byte: no need to wait for a whole packet of
        // whatever a non-MQTT peer is sending.
        return Err(ProtocolError::Protocol("first packet is not CONNECT"));
    }
    let Some((first, remaining, header_len)) = fixed_header(buf)? else {
        return Ok(DecodeOutcome::Incomplete(None));
    };
    let total = header_len + remaining;
    if total > max_packet_size {
        return Err(ProtocolError::TooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    if buf.len() < total {
        return Ok(DecodeOutcome::Incomplete(Some(total)));
    }
    // One copy of the body, so slices of it do not pin the (reused) socket buffer.
    let body = Bytes::copy_from_slice(&buf[header_len..total]);
    buf.advance(total);
    let packet = decode_body(first, body, version)?;
    Ok(DecodeOutcome::Packet(packet, total))
}

pub(super) fn expect_flags(first: u8, flags: u8) -> Result<(), ProtocolError> {
    if first & 0x0f != flags {
        // [MQTT-2.1.3-1] reserved flag bits must be as specified; anything else is malformed.
        return Err(ProtocolError::Malformed("invalid fixed header flags"));
    }
    Ok(())
}

fn decode_body(
    first: u8,
    body: Bytes,
    version: Option<ProtocolVersion>,
) -> Result<Packet, ProtocolError> {
    let kind = first >> 4;
    let Some(version) = version else {
        if kind != 1 {
            return Err(ProtocolError::Protocol("first packet is not CONNECT"));
        }
        expect_flags(first, 0)?;
        return decode_connect(body).map(|c| Packet::Connect(Box::new(c)));
    };
    let v5 = version.is_v5();
    let mut r = Reader::new(body);
    match kind {
        // [MQTT-3.1.0-2] a second CONNECT is a protocol violation.
        1 => Err(ProtocolError::Protocol("second CONNECT")),
        3 => decode_publish(first, &mut r, v5, Context::Publish).map(Packet::Publish),
        4 => {
            expect_flags(first, 0)?;
            decode_pub_response(&mut r, v5).map(Packet::PubAck)
        }
        5 => {
            expect_flags(first, 0)?;
            decode_pub_response(&mut r, v5).map(Packet::PubRec)
        }
        6 => {
            // [MQTT-3.6.1-1]
            expect_flags(first, 0b0010)?;
            decode_pub_response(&mut r, v5).map(Packet::PubRel)
        }
        7 => {
            expect_flags(first, 0)?;
            decode_pub_response(&mut r, v5).map(Packet::PubComp)
        }
        8 => {
            // [MQTT-3.8.1-1]
            expect_flags(first, 0b0010)?;
            decode_subscribe(&mut r, v5).map(Packet::Subscribe)
        }
        10 => {
            // [MQTT-3.10.1-1]
            expect_flags(first, 0b0010)?;
            decode_unsubscribe(&mut r, v5).map(Packet::Unsubscribe)
        }
        12 => {
            expect_flags(first, 0)?;
            if r.remaining() != 0 {
                return Err(ProtocolError::Malformed("PINGREQ with a body"));
            }
            Ok(Packet::PingReq)
        }
        14 => {
            expect_flags(first, 0)?;
            decode_disconnect(&mut r, v5).map(Packet::Disconnect)
        }
        15 if v5 => {
            expect_flags(first, 0)?;
            let reason = if r.remaining() == 0 { 0 } else { r.u8()? };
            let properties = if r.remaining() == 0 {
                Properties::default()
            } else {
                read_properties(&mut r, Context::Auth)?
            };
            Ok(Packet::Auth(Box::new(Auth { reason, properties })))
        }
        0 => Err(ProtocolError::Malformed("reserved packet type 0")),
        _ => Err(ProtocolError::Protocol(
            "packet type not allowed from a client",
        )),
    }
}

fn decode_connect(body: Bytes) -> Result<Connect, ProtocolError> {
    let mut r = Reader::new(body);
    let name = r.binary()?;
    let level = r.u8()?;
    let version = match (&name[..], level) {
        (b"MQTT", 4) => ProtocolVersion::V3_1_1,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQIsdp", 3) => ProtocolVersion::V3_1,
        // [MQTT-3.1.2-2] a known protocol name at a level we do not speak: CONNACK 0x01. 3.1
        // (MQIsdp) says the same: "unacceptable protocol version" for a version it does not
        // support, so MQIsdp at level 4 or 5 is refused with 0x01, not dropped.
        (b"MQTT" | b"MQIsdp", l) => return Err(ProtocolError::UnsupportedProtocolVersion(l)),
        // [MQTT-3.1.2-1] not an MQTT client: close without CONNACK.
        _ => return Err(ProtocolError::Protocol("unknown protocol name")),
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        // [MQTT-3.1.2-3] the reserved flag must be 0.
        return Err(ProtocolError::Malformed("CONNECT reserved flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        // [MQTT-3.1.2-11] [MQTT-3.1.2-13] [MQTT-3.1.2-15]
        return Err(ProtocolError::Malformed(
            "will QoS or retain set without will flag",
        ));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(ProtocolError::Malformed("will QoS 3"))?; // [MQTT-3.1.2-14]
    if password_flag && !username_flag && !version.is_v5() {
        // [MQTT-3.1.2-22] (3.1.1): password without user name.
        return Err(ProtocolError::Malformed(
            "password flag without user name flag",
        ));
    }
    let keep_alive = r.u16()?;
    let properties = if version.is_v5() {
        read_properties(&mut r, Context::Connect)?
    } else {
        Properties::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let wprops = if version.is_v5() {
            read_publish_properties(&mut r, Context::Will)?
        } else {
            PublishProperties::default()
        };
        let topic = r.string()?;
        if !validate::is_valid_topic_name(topic.as_str()) {
            return Err(ProtocolError::TopicNameInvalid);
        }
        let payload = Bytes::copy_from_slice(&r.binary()?);
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            delay_interval: wprops.will_delay_interval.unwrap_or(0),
            properties: PublishProperties {
                will_delay_interval: None,
                ..wprops
            },
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string()?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary()?)
    } else {
        None
    };
    if r.remaining() != 0 {
        return Err(ProtocolError::Malformed(
            "trailing bytes after CONNECT payload",
        ));
    }
    Ok(Connect {
        version,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

/// PUBLISH in either direction: `ctx` is [`Context::Publish`] from a client and
/// [`Context::PublishFromServer`] when Tern is the client (a bridge), where Subscription
/// Identifiers are allowed.
pub(super) fn decode_publish(
    first: u8,
    r: &mut Reader,
    v5: bool,
    ctx: Context,
) -> Result<Publish, ProtocolError> {
    let dup = first & 0x08 != 0;
    let qos =
        QoS::from_u8((first >> 1) & 0x03).ok_or(ProtocolError::Malformed("PUBLISH with QoS 3"))?; // [MQTT-3.3.1-4]
    if dup && qos == QoS::AtMostOnce {
        // [MQTT-3.3.1-2]
        return Err(ProtocolError::Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let retain = first & 0x01 != 0;
    let topic = r.string()?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        let id = r.u16()?;
        if id == 0 {
            // [MQTT-2.3.1-1]
            return Err(ProtocolError::Malformed("packet identifier 0"));
        }
        id
    };
    let properties = if v5 {
        read_publish_properties(r, ctx)?
    } else {
        PublishProperties::default()
    };
    let payload = r.rest();
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        properties,
        payload,
    })
}

pub(super) fn decode_pub_response(r: &mut Reader, v5: bool) -> Result<PubResponse, ProtocolError> {
    let packet_id = r.u16()?;
    if packet_id == 0 {
        return Err(ProtocolError::Malformed("packet identifier 0"));
    }
    let mut reason = 0;
    if v5 {
        if r.remaining() > 0 {
            reason = r.u8()?;
        }
        if r.remaining() > 0 {
            read_properties(r, Context::PubResponse)?;
        }
    }
    if r.remaining() != 0 {
        return Err(ProtocolError::Malformed(
            "trailing bytes in acknowledgement",
        ));
    }
    Ok(PubResponse { packet_id, reason })
}

fn decode_subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, ProtocolError> {
    let packet_id = r.u16()?;
    if packet_id == 0 {
        return Err(ProtocolError::Malformed("packet identifier 0"));
    }
    let subscription_identifier = if v5 {
        read_properties(r, Context::Subscribe)?.subscription_identifier
    } else {
        None
    };
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.string()?;
        let o = r.u8()?;
        let qos = QoS::from_u8(o & 0x03).ok_or(ProtocolError::Malformed("subscription QoS 3"))?; // [MQTT-3.8.3-4]
        let options = if v5 {
            if o & 0xc0 != 0 {
                // [MQTT-3.8.3-5]
                return Err(ProtocolError::Malformed(
                    "reserved subscription option bits set",
                ));
            }
            let retain_handling = (o >> 4) & 0x03;
            if retain_handling == 3 {
                return Err(ProtocolError::Protocol("retain handling 3"));
            }
            SubscriptionOptions {
                qos,
                no_local: o & 0x04 != 0,
                retain_as_published: o & 0x08 != 0,
                retain_handling,
            }
        } else {
            if o & 0xfc != 0 {
                // [MQTT-3.8.3-4] (3.1.1) upper six bits must be 0.
                return Err(ProtocolError::Malformed(
                    "reserved subscription option bits set",
                ));
            }
            SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            }
        };
        filters.push((filter, options));
    }
    if filters.is_empty() {
        // [MQTT-3.8.3-3]
        return Err(ProtocolError::Protocol("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe {
        packet_id,
        subscription_identifier,
        filters,
    })
}

fn decode_unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, ProtocolError> {
    let packet_id = r.u16()?;
    if packet_id == 0 {
        return Err(ProtocolError::Malformed("packet identifier 0"));
    }
    if v5 {
        read_properties(r, Context::Unsubscribe)?;
    }
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        // [MQTT-3.10.3-2]
        return Err(ProtocolError::Protocol("UNSUBSCRIBE without topic filters"));
    }
    Ok(Unsubscribe { packet_id, filters })
}

fn decode_disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect, ProtocolError> {
    if !v5 {
        if r.remaining() != 0 {
            return Err(ProtocolError::Malformed("DISCONNECT with a body"));
        }
        return Ok(Disconnect {
            reason: 0,
            session_expiry_interval: None,
        });
    }
    // v5: remaining length 0 means reason 0x00 with no properties; 1 means reason only.
    let reason = if r.remaining() == 0 { 0 } else { r.u8()? };
    let session_expiry_interval = if r.remaining() == 0 {
        None
    } else {
        read_properties(r, Context::Disconnect)?.session_expiry_interval
    };
    if r.remaining() != 0 {
        return Err(ProtocolError::Malformed("trailing bytes in DISCONNECT"));
    }
    Ok(Disconnect {
        reason,
        session_expiry_interval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8], version: Option<ProtocolVersion>) -> Result<Packet, ProtocolError> {
        let mut buf = BytesMut::from(bytes);
        match decode_packet(&mut buf, version, 1 << 20)? {
            DecodeOutcome::Packet(p, n) => {
                assert_eq!(n, bytes.len());
                assert!(buf.is_empty());
                Ok(p)
            }
            DecodeOutcome::Incomplete(_) => panic!("incomplete"),
        }
    }

    const V4: Option<ProtocolVersion> = Some(ProtocolVersion::V3_1_1);
    const V5: Option<ProtocolVersion> = Some(ProtocolVersion::V5);

    #[test]
    fn connect_v311_minimal() {
        let p = decode(
            &[
                0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'c', b'1',
            ],
            None,
        )
        .unwrap();
        let Packet::Connect(c) = p else { panic!() };
        assert_eq!(c.version, ProtocolVersion::V3_1_1);
        assert!(c.clean_start);
        assert_eq!(c.keep_alive, 60);
        assert_eq!(c.client_id.as_str(), "c1");
    }

    #[test]
    fn connect_mqtt31_mqisdp() {
        let p = decode(
            &[
                0x10, 0x10, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 10, 0, 2, b'o',
                b'k',
            ],
            None,
        )
        .unwrap();
        let Packet::Connect(c) = p else { panic!() };
        assert_eq!(c.version, ProtocolVersion::V3_1);
    }

    #[test]
    fn connect_v5_with_properties_and_will() {
        let bytes = [
            0x10, 0x20, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x0e, 0,
            30, // flags: clean, will qos1
            5, 0x11, 0, 0, 0, 10, // session expiry 10
            0, 1, b'c', // client id
            5, 0x18, 0, 0, 0, 3, // will delay 3
            0, 1, b'w', // will topic
            0, 2, b'h', b'i', // will payload
        ];
        let Packet::Connect(c) = decode(&bytes, None).unwrap() else {
            panic!()
        };
        assert_eq!(c.properties.session_expiry_interval, Some(10));
        let w = c.will.unwrap();
        assert_eq!(w.delay_interval, 3);
        assert_eq!(w.qos, QoS::AtLeastOnce);
        assert_eq!(&w.payload[..], b"hi");
    }

    #[test]
    fn unsupported_level_and_unknown_name() {
        let mut b = vec![
            0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 6, 0x02, 0, 60, 0, 2, b'c', b'1',
        ];
        assert_eq!(
            decode(&b, None).unwrap_err(),
            ProtocolError::UnsupportedProtocolVersion(6)
        );
        b[4] = b'X';
        assert!(matches!(decode(&b, None), Err(ProtocolError::Protocol(_))));
        // MQIsdp is only ever level 3: any other level is an unsupported version (CONNACK
        // 0x01), as for "MQTT".
        let mut b = [
            0x10, 0x10, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 4, 0x02, 0, 10, 0, 2, b'o', b'k',
        ];
        assert_eq!(
            decode(&b, None).unwrap_err(),
            ProtocolError::UnsupportedProtocolVersion(4)
        );
        b[10] = 5;
        assert_eq!(
            decode(&b, None).unwrap_err(),
            ProtocolError::UnsupportedProtocolVersion(5)
        );
        // A wrong name is not MQTT at all: no CONNACK.
        b[4] = b'X';
        assert!(matches!(decode(&b, None), Err(ProtocolError::Protocol(_))));
    }

    /// Table of malformed or forbidden packets, each tagged by the statement it violates.
    #[test]
    fn malformed_table() {
        let cases: &[(&str, &[u8], Option<ProtocolVersion>)] = &[
            (
                "[MQTT-1.5.5-1] remaining length longer than its shortest form",
                &[0xe0, 0x80, 0x80, 0x00],
                Some(ProtocolVersion::V5),
            ),
            (
                "[MQTT-1.5.5-1] remaining length longer than its shortest form (3.1.1)",
                &[0xc0, 0x80, 0x00],
                Some(ProtocolVersion::V3_1_1),
            ),
            (
                "[MQTT-3.1.0-1] first packet not CONNECT",
                &[0xc0, 0x00],
                None,
            ),
            (
                "[MQTT-3.1.2-3] reserved connect flag",
                &[
                    0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 60, 0, 2, b'c', b'1',
                ],
                None,
            ),
            (
                "[MQTT-3.1.2-11] will qos without will flag",
                &[
                    0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x0a, 0, 60, 0, 2, b'c', b'1',
                ],
                None,
            ),
            (
                "[MQTT-3.1.2-22] password without username",
                &[
                    0x10, 0x12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x42, 0, 60, 0, 2, b'c', b'1', 0,
                    2, b'p', b'w',
                ],
                None,
            ),
            (
                "[MQTT-3.1.0-2] second CONNECT",
                &[
                    0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'c', b'1',
                ],
                V4,
            ),
            ("[MQTT-3.3.1-4] QoS 3", &[0x36, 0x05, 0, 1, b'a', 0, 1], V4),
            ("[MQTT-3.3.1-2] DUP on QoS 0", &[0x38, 0x03, 0, 1, b'a'], V4),
            (
                "[MQTT-2.3.1-1] packet id 0",
                &[0x32, 0x05, 0, 1, b'a', 0, 0],
                V4,
            ),
            (
                "[MQTT-1.5.4-2] NUL in topic",
                &[0x30, 0x04, 0, 2, b'a', 0],
                V4,
            ),
            (
                "[MQTT-1.5.4-1] bad UTF-8 topic",
                &[0x30, 0x04, 0, 2, 0xc3, 0x28],
                V4,
            ),
            ("[MQTT-3.6.1-1] PUBREL flags 0", &[0x60, 0x02, 0, 1], V4),
            (
                "[MQTT-3.8.1-1] SUBSCRIBE flags 0",
                &[0x80, 0x06, 0, 1, 0, 1, b'a', 0],
                V4,
            ),
            (
                "[MQTT-3.10.1-1] UNSUBSCRIBE flags 0",
                &[0xa0, 0x05, 0, 1, 0, 1, b'a'],
                V4,
            ),
            ("[MQTT-2.1.3-1] PINGREQ flags", &[0xc1, 0x00], V4),
            ("[MQTT-2.1.3-1] PUBACK flags", &[0x41, 0x02, 0, 1], V4),
            ("[MQTT-3.8.3-3] empty SUBSCRIBE", &[0x82, 0x02, 0, 1], V4),
            ("[MQTT-3.10.3-2] empty UNSUBSCRIBE", &[0xa2, 0x02, 0, 1], V4),
            (
                "[MQTT-3.8.3-4] reserved option bits (3.1.1)",
                &[0x82, 0x06, 0, 1, 0, 1, b'a', 0x04],
                V4,
            ),
            (
                "[MQTT-3.8.3-5] reserved option bits (v5)",
                &[0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0xc0],
                V5,
            ),
            (
                "retain handling 3 (v5)",
                &[0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0x30],
                V5,
            ),
            (
                "[MQTT-3.3.4-6] subscription id in PUBLISH",
                &[0x30, 0x06, 0, 1, b'a', 2, 0x0b, 1],
                V5,
            ),
            (
                "duplicate property",
                &[0x30, 0x09, 0, 1, b'a', 5, 0x23, 0, 1, 0x23, 0],
                V5,
            ),
            (
                "[MQTT-1.5.5-1] property identifier 1 as two bytes (81 00)",
                &[0x30, 0x07, 0, 0, 3, 0x81, 0x00, 0, 0],
                V5,
            ),
            (
                "[MQTT-1.5.5-1] property length 0 as two bytes (80 00)",
                &[0x30, 0x05, 0, 1, b'a', 0x80, 0x00],
                V5,
            ),
            (
                "3.10.2.1 Reason String in UNSUBSCRIBE (v5)",
                &[0xa2, 0x0a, 0, 1, 4, 0x1f, 0, 1, b'r', 0, 1, b'a'],
                V5,
            ),
            ("server-only packet type CONNACK", &[0x20, 0x02, 0, 0], V4),
            ("AUTH from 3.1.1", &[0xf0, 0x00], V4),
            ("reserved type 0", &[0x00, 0x00], V4),
            ("3.1.1 DISCONNECT with a body", &[0xe0, 0x01, 0x00], V4),
        ];
        for (name, bytes, version) in cases {
            assert!(decode(bytes, *version).is_err(), "{name} was accepted");
        }
    }

    #[test]
    fn v5_disconnect_of_zero_and_one_byte() {
        let Packet::Disconnect(d) = decode(&[0xe0, 0x00], V5).unwrap() else {
            panic!()
        };
        assert_eq!(d.reason, 0);
        let Packet::Disconnect(d) = decode(&[0xe0, 0x01, 0x04], V5).unwrap() else {
            panic!()
        };
        assert_eq!(d.reason, 4);
        let Packet::Disconnect(d) =
            decode(&[0xe0, 0x07, 0x00, 0x05, 0x11, 0, 0, 0, 9], V5).unwrap()
        else {
            panic!()
        };
        assert_eq!(d.session_expiry_interval, Some(9));
    }

    #[test]
    fn v5_puback_short_forms() {
        for bytes in [
            &[0x40u8, 0x02, 0, 7][..],
            &[0x40, 0x03, 0, 7, 0x10],
            &[0x40, 0x04, 0, 7, 0, 0],
        ] {
            let Packet::PubAck(a) = decode(bytes, V5).unwrap() else {
                panic!()
            };
            assert_eq!(a.packet_id, 7);
        }
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        // Remaining length 2,000,000 announced; only the header has arrived.
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x89, 0x7a][..]);
        let err = decode_packet(&mut buf, V4, 1 << 20).unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { .. }));
    }

    #[test]
    fn incomplete_then_complete() {
        let full = [0x32u8, 0x07, 0, 1, b'a', 0, 9, b'h', b'i'];
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert!(matches!(
                decode_packet(&mut buf, V4, 1 << 20).unwrap(),
                DecodeOutcome::Incomplete(_)
            ));
            assert_eq!(buf.len(), cut, "nothing consumed while incomplete");
        }
        let Packet::Publish(p) = decode(&full, V4).unwrap() else {
            panic!()
        };
        assert_eq!(p.packet_id, 9);
        assert_eq!(&p.payload[..], b"hi");
    }

    #[test]
    fn v5_publish_properties_decode() {
        let bytes = [
            0x30, 0x18, 0, 1, b't', 0x13, // props len 19
            0x01, 1, // payload format
            0x02, 0, 0, 0, 60, // expiry
            0x08, 0, 1, b'r', // response topic
            0x09, 0, 2, 1, 2, // correlation
            0x23, 0, 3, // alias
            b'x',
        ];
        let Packet::Publish(p) = decode(&bytes, V5).unwrap() else {
            panic!()
        };
        assert_eq!(p.properties.payload_format_indicator, Some(1));
        assert_eq!(p.properties.message_expiry_interval, Some(60));
        assert_eq!(p.properties.response_topic.unwrap().as_str(), "r");
        assert_eq!(&p.properties.correlation_data.unwrap()[..], &[1, 2]);
        assert_eq!(p.properties.topic_alias, Some(3));
        assert_eq!(&p.payload[..], b"x");
    }
}
