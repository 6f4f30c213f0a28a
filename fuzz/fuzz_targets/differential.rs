//! `differential`: Tern's codec against `mqttbytes` 0.6 (crates.io), an independent
//! implementation, on arbitrary bytes, for MQTT 3.1.1 and 5.0.
//!
//! The first input byte picks the version (`% 2`: 0 = 3.1.1, 1 = 5.0); the rest is read as a
//! stream of packets. For each packet at the front of the stream (a CONNECT is decoded by Tern
//! as the first packet of a connection, anything else in the chosen version):
//!
//! - **same bytes**: if Tern accepts the packet, `mqttbytes` must decode the same bytes to the
//!   same fields, and take as many bytes for it. This stands in for a re-encoding where Tern
//!   has no encoder (CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ: a broker never sends them).
//! - **(1) Tern → mqttbytes**: if Tern accepts a PUBLISH, an acknowledgement or (5.0) a
//!   DISCONNECT, Tern's encoder writes it again and `mqttbytes` must read the same fields.
//! - **(2) mqttbytes → Tern**: if `mqttbytes` decodes a packet a client sends, `mqttbytes`
//!   writes it again and Tern must decode the same fields, or reject it when the packet breaks
//!   a rule of the specification that `mqttbytes` does not check ([`spec_violation`]); Tern
//!   must reject those.
//!
//! "The same fields" are those both codecs keep ([`Fields`]). Known `mqttbytes` limitations
//! are skipped where they apply, each with a comment and a row in docs/fuzzing.md's table;
//! every other disagreement panics with both sides and the bytes.
#![no_main]

use bytes::{Buf, BytesMut};
use libfuzzer_sys::fuzz_target;
use mqttbytes::{v4, v5};
use tern::protocol::{
    decode_packet, encode_disconnect, encode_pub_response, encode_publish, publish_size,
    DecodeOutcome, OutgoingPublish, Packet, ProtocolVersion, PublishExtras, PublishProperties,
    ReasonCode, PUBACK, PUBCOMP, PUBREC, PUBREL,
};

/// Well above any input libFuzzer makes (default -max_len 4096): size limits are not tested.
const MAX: usize = 1 << 20;

/// The properties of an application message (PUBLISH, will).
#[derive(Debug, Clone, PartialEq, Default)]
struct MessageProps {
    payload_format: Option<u8>,
    expiry: Option<u32>,
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation: Option<Vec<u8>>,
    user: Vec<(String, String)>,
    topic_alias: Option<u16>,
}

#[derive(Debug, Clone, PartialEq)]
struct WillFields {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    /// Tern keeps 0 for "absent" (the spec's default).
    delay: u32,
    props: MessageProps,
}

#[derive(Debug, Clone, PartialEq, Default)]
struct ConnectProps {
    session_expiry: Option<u32>,
    receive_maximum: Option<u16>,
    maximum_packet_size: Option<u32>,
    topic_alias_maximum: Option<u16>,
    request_response_information: Option<u8>,
    request_problem_information: Option<u8>,
    user: Vec<(String, String)>,
    auth_method: Option<String>,
    auth_data: Option<Vec<u8>>,
}

/// What both codecs keep of a packet a client sends.
#[derive(Debug, Clone, PartialEq)]
enum Fields {
    Connect {
        level: u8,
        clean: bool,
        keep_alive: u16,
        client_id: String,
        will: Option<WillFields>,
        /// An empty user name or password is None: `mqttbytes` cannot tell it from an
        /// absent one (see `credential`).
        username: Option<String>,
        password: Option<Vec<u8>>,
        props: ConnectProps,
    },
    Publish {
        dup: bool,
        qos: u8,
        retain: bool,
        topic: String,
        pkid: u16,
        payload: Vec<u8>,
        props: MessageProps,
    },
    /// PUBACK (4), PUBREC (5), PUBREL (6), PUBCOMP (7); Tern keeps no ack properties.
    Ack {
        kind: u8,
        pkid: u16,
        reason: u8,
    },
    /// Options as the wire byte; Tern keeps the Subscription Identifier, not user properties.
    Subscribe {
        pkid: u16,
        id: Option<u32>,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// Tern keeps the reason and the Session Expiry Interval.
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
}

/// Limitation of `mqttbytes`: its `Login` writes an empty user name or password as absent
/// (flag clear) and reads a CONNECT whose user name and password are both empty as no login,
/// so an empty credential compares as absent.
fn credential<T: AsRef<[u8]>>(c: Option<T>) -> Option<T> {
    c.filter(|c| !c.as_ref().is_empty())
}

fn pairs(u: &[(tern::protocol::MqttStr, tern::protocol::MqttStr)]) -> Vec<(String, String)> {
    u.iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.as_str().to_owned()))
        .collect()
}

fn tern_message_props(p: &PublishProperties) -> MessageProps {
    MessageProps {
        payload_format: p.payload_format_indicator,
        expiry: p.message_expiry_interval,
        content_type: p.content_type.as_ref().map(|s| s.as_str().to_owned()),
        response_topic: p.response_topic.as_ref().map(|s| s.as_str().to_owned()),
        correlation: p.correlation_data.as_ref().map(|d| d.to_vec()),
        user: pairs(&p.user_properties),
        topic_alias: p.topic_alias,
    }
}

fn level(v: ProtocolVersion) -> u8 {
    match v {
        ProtocolVersion::V3_1 => 3,
        ProtocolVersion::V3_1_1 => 4,
        ProtocolVersion::V5 => 5,
    }
}

fn from_tern(p: &Packet) -> Fields {
    match p {
        Packet::Connect(c) => Fields::Connect {
            level: level(c.version),
            clean: c.clean_start,
            keep_alive: c.keep_alive,
            client_id: c.client_id.as_str().to_owned(),
            will: c.will.as_ref().map(|w| WillFields {
                topic: w.topic.as_str().to_owned(),
                payload: w.payload.to_vec(),
                qos: w.qos.as_u8(),
                retain: w.retain,
                delay: w.delay_interval,
                props: tern_message_props(&w.properties),
            }),
            username: credential(c.username.as_ref().map(|u| u.as_str().to_owned())),
            password: credential(c.password.as_ref().map(|p| p.to_vec())),
            props: ConnectProps {
                session_expiry: c.properties.session_expiry_interval,
                receive_maximum: c.properties.receive_maximum,
                maximum_packet_size: c.properties.maximum_packet_size,
                topic_alias_maximum: c.properties.topic_alias_maximum,
                request_response_information: c.properties.request_response_information,
                request_problem_information: c.properties.request_problem_information,
                user: pairs(&c.properties.user_properties),
                auth_method: c
                    .properties
                    .authentication_method
                    .as_ref()
                    .map(|s| s.as_str().to_owned()),
                auth_data: c
                    .properties
                    .authentication_data
                    .as_ref()
                    .map(|d| d.to_vec()),
            },
        },
        Packet::Publish(p) => Fields::Publish {
            dup: p.dup,
            qos: p.qos.as_u8(),
            retain: p.retain,
            topic: p.topic.as_str().to_owned(),
            pkid: p.packet_id,
            payload: p.payload.to_vec(),
            props: tern_message_props(&p.properties),
        },
        Packet::PubAck(a) => ack(4, a.packet_id, a.reason),
        Packet::PubRec(a) => ack(5, a.packet_id, a.reason),
        Packet::PubRel(a) => ack(6, a.packet_id, a.reason),
        Packet::PubComp(a) => ack(7, a.packet_id, a.reason),
        Packet::Subscribe(s) => Fields::Subscribe {
            pkid: s.packet_id,
            id: s.subscription_identifier,
            filters: s
                .filters
                .iter()
                .map(|(f, o)| {
                    let byte = o.qos.as_u8()
                        | u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | o.retain_handling << 4;
                    (f.as_str().to_owned(), byte)
                })
                .collect(),
        },
        Packet::Unsubscribe(u) => Fields::Unsubscribe {
            pkid: u.packet_id,
            filters: u.filters.iter().map(|f| f.as_str().to_owned()).collect(),
        },
        Packet::PingReq => Fields::PingReq,
        Packet::Disconnect(d) => Fields::Disconnect {
            reason: d.reason,
            session_expiry: d.session_expiry_interval,
        },
        // No AUTH in mqttbytes 0.6: callers skip it before asking.
        Packet::Auth(_) => unreachable!("AUTH has no mqttbytes counterpart"),
    }
}

fn ack(kind: u8, pkid: u16, reason: u8) -> Fields {
    Fields::Ack { kind, pkid, reason }
}

fn v5_message_props(p: Option<&v5::PublishProperties>) -> MessageProps {
    let Some(p) = p else {
        return MessageProps::default();
    };
    MessageProps {
        payload_format: p.payload_format_indicator,
        expiry: p.message_expiry_interval,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation: p.correlation_data.as_ref().map(|d| d.to_vec()),
        user: p.user_properties.clone(),
        topic_alias: p.topic_alias,
    }
}

fn v5_will_props(p: Option<&v5::WillProperties>) -> (u32, MessageProps) {
    let Some(p) = p else {
        return (0, MessageProps::default());
    };
    let props = MessageProps {
        payload_format: p.payload_format_indicator,
        expiry: p.message_expiry_interval,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation: p.correlation_data.as_ref().map(|d| d.to_vec()),
        user: p.user_properties.clone(),
        topic_alias: None,
    };
    (p.delay_interval.unwrap_or(0), props)
}

/// Fields of a client packet read by `mqttbytes` v4; None for the packets a server sends.
fn from_v4(p: &v4::Packet) -> Option<Fields> {
    Some(match p {
        v4::Packet::Connect(c) => Fields::Connect {
            level: match c.protocol {
                mqttbytes::Protocol::V4 => 4,
                mqttbytes::Protocol::V5 => 5,
            },
            clean: c.clean_session,
            keep_alive: c.keep_alive,
            client_id: c.client_id.clone(),
            will: c.last_will.as_ref().map(|w| WillFields {
                topic: w.topic.clone(),
                payload: w.message.to_vec(),
                qos: w.qos as u8,
                retain: w.retain,
                delay: 0,
                props: MessageProps::default(),
            }),
            username: credential(c.login.as_ref().map(|l| l.username.clone())),
            password: credential(c.login.as_ref().map(|l| l.password.as_bytes().to_vec())),
            props: ConnectProps::default(),
        },
        v4::Packet::Publish(p) => Fields::Publish {
            dup: p.dup,
            qos: p.qos as u8,
            retain: p.retain,
            topic: p.topic.clone(),
            pkid: p.pkid,
            payload: p.payload.to_vec(),
            props: MessageProps::default(),
        },
        v4::Packet::PubAck(a) => ack(4, a.pkid, 0),
        v4::Packet::PubRec(a) => ack(5, a.pkid, 0),
        v4::Packet::PubRel(a) => ack(6, a.pkid, 0),
        v4::Packet::PubComp(a) => ack(7, a.pkid, 0),
        v4::Packet::Subscribe(s) => Fields::Subscribe {
            pkid: s.pkid,
            id: None,
            filters: s
                .filters
                .iter()
                .map(|f| (f.path.clone(), f.qos as u8))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => Fields::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics.clone(),
        },
        v4::Packet::PingReq => Fields::PingReq,
        v4::Packet::Disconnect => Fields::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        v4::Packet::ConnAck(_)
        | v4::Packet::SubAck(_)
        | v4::Packet::UnsubAck(_)
        | v4::Packet::PingResp => return None,
    })
}

/// Fields of a client packet read by `mqttbytes` v5; None for the packets a server sends.
fn from_v5(p: &v5::Packet) -> Option<Fields> {
    Some(match p {
        v5::Packet::Connect(c) => {
            let props = c.properties.as_ref();
            Fields::Connect {
                level: match c.protocol {
                    mqttbytes::Protocol::V4 => 4,
                    mqttbytes::Protocol::V5 => 5,
                },
                clean: c.clean_session,
                keep_alive: c.keep_alive,
                client_id: c.client_id.clone(),
                will: c.last_will.as_ref().map(|w| {
                    let (delay, props) = v5_will_props(w.properties.as_ref());
                    WillFields {
                        topic: w.topic.clone(),
                        payload: w.message.to_vec(),
                        qos: w.qos as u8,
                        retain: w.retain,
                        delay,
                        props,
                    }
                }),
                username: credential(c.login.as_ref().map(|l| l.username.clone())),
                password: credential(c.login.as_ref().map(|l| l.password.as_bytes().to_vec())),
                props: ConnectProps {
                    session_expiry: props.and_then(|p| p.session_expiry_interval),
                    receive_maximum: props.and_then(|p| p.receive_maximum),
                    maximum_packet_size: props.and_then(|p| p.max_packet_size),
                    topic_alias_maximum: props.and_then(|p| p.topic_alias_max),
                    request_response_information: props.and_then(|p| p.request_response_info),
                    request_problem_information: props.and_then(|p| p.request_problem_info),
                    user: props.map(|p| p.user_properties.clone()).unwrap_or_default(),
                    auth_method: props.and_then(|p| p.authentication_method.clone()),
                    auth_data: props
                        .and_then(|p| p.authentication_data.as_ref().map(|d| d.to_vec())),
                },
            }
        }
        v5::Packet::Publish(p) => Fields::Publish {
            dup: p.dup,
            qos: p.qos as u8,
            retain: p.retain,
            topic: p.topic.clone(),
            pkid: p.pkid,
            payload: p.payload.to_vec(),
            props: v5_message_props(p.properties.as_ref()),
        },
        v5::Packet::PubAck(a) => ack(4, a.pkid, a.reason as u8),
        v5::Packet::PubRec(a) => ack(5, a.pkid, a.reason as u8),
        v5::Packet::PubRel(a) => ack(6, a.pkid, a.reason as u8),
        v5::Packet::PubComp(a) => ack(7, a.pkid, a.reason as u8),
        v5::Packet::Subscribe(s) => Fields::Subscribe {
            pkid: s.pkid,
            id: s.properties.as_ref().and_then(|p| p.id).map(|id| id as u32),
            filters: s
                .filters
                .iter()
                .map(|f| {
                    let rh = match f.retain_forward_rule {
                        v5::RetainForwardRule::OnEverySubscribe => 0,
                        v5::RetainForwardRule::OnNewSubscribe => 1,
                        v5::RetainForwardRule::Never => 2,
                    };
                    let byte = f.qos as u8
                        | u8::from(f.nolocal) << 2
                        | u8::from(f.preserve_retain) << 3
                        | rh << 4;
                    (f.path.clone(), byte)
                })
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => Fields::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters.clone(),
        },
        v5::Packet::PingReq => Fields::PingReq,
        v5::Packet::Disconnect(d) => Fields::Disconnect {
            reason: d.reason_code as u8,
            session_expiry: d
                .properties
                .as_ref()
                .and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::ConnAck(_)
        | v5::Packet::SubAck(_)
        | v5::Packet::UnsubAck(_)
        | v5::Packet::PingResp => return None,
    })
}

/// One packet decoded by `mqttbytes` in the version of the stream.
// Made and consumed once per packet: boxing would cost an allocation for nothing.
#[allow(clippy::large_enum_variant)]
enum Mq {
    V4(v4::Packet),
    V5(v5::Packet),
}

impl Mq {
    fn read(buf: &mut BytesMut, v5: bool) -> Result<Mq, mqttbytes::Error> {
        if v5 {
            v5::read(buf, MAX).map(Mq::V5)
        } else {
            v4::read(buf, MAX).map(Mq::V4)
        }
    }

    fn fields(&self) -> Option<Fields> {
        match self {
            Mq::V4(p) => from_v4(p),
            Mq::V5(p) => from_v5(p),
        }
    }

    /// `mqttbytes`' own encoding of the packet (client packets only).
    fn write(&self, buf: &mut BytesMut) -> Result<usize, mqttbytes::Error> {
        match self {
            Mq::V4(p) => match p {
                v4::Packet::Connect(c) => c.write(buf),
                v4::Packet::Publish(p) => p.write(buf),
                v4::Packet::PubAck(a) => a.write(buf),
                v4::Packet::PubRec(a) => a.write(buf),
                v4::Packet::PubRel(a) => a.write(buf),
                v4::Packet::PubComp(a) => a.write(buf),
                v4::Packet::Subscribe(s) => s.write(buf),
                v4::Packet::Unsubscribe(u) => u.write(buf),
                v4::Packet::PingReq => v4::PingReq.write(buf),
                v4::Packet::Disconnect => v4::Disconnect.write(buf),
                other => unreachable!("not a client packet: {other:?}"),
            },
            Mq::V5(p) => match p {
                v5::Packet::Connect(c) => c.write(buf),
                v5::Packet::Publish(p) => p.write(buf),
                v5::Packet::PubAck(a) => a.write(buf),
                v5::Packet::PubRec(a) => a.write(buf),
                v5::Packet::PubRel(a) => a.write(buf),
                v5::Packet::PubComp(a) => a.write(buf),
                v5::Packet::Subscribe(s) => s.write(buf),
                v5::Packet::Unsubscribe(u) => u.write(buf),
                v5::Packet::PingReq => v5::PingReq.write(buf),
                v5::Packet::Disconnect(d) => d.write(buf),
                other => unreachable!("not a client packet: {other:?}"),
            },
        }
    }
}

fn is_topic_name(t: &str) -> bool {
    !t.is_empty() && !t.contains(['+', '#'])
}

fn flag_ok(v: Option<u8>) -> bool {
    v.is_none_or(|v| v <= 1)
}

/// Every UTF-8 string field of a client packet as `mqttbytes` holds it (its password is a
/// string too, but binary data in MQTT, so it is left out).
fn strings(p: &Mq) -> Vec<&str> {
    fn user<'a>(u: &'a [(String, String)], out: &mut Vec<&'a str>) {
        for (k, v) in u {
            out.push(k);
            out.push(v);
        }
    }
    let mut out: Vec<&str> = Vec::new();
    match p {
        Mq::V4(p) => match p {
            v4::Packet::Connect(c) => {
                out.push(&c.client_id);
                if let Some(w) = &c.last_will {
                    out.push(&w.topic);
                }
                if let Some(l) = &c.login {
                    out.push(&l.username);
                }
            }
            v4::Packet::Publish(p) => out.push(&p.topic),
            v4::Packet::Subscribe(s) => out.extend(s.filters.iter().map(|f| f.path.as_str())),
            v4::Packet::Unsubscribe(u) => out.extend(u.topics.iter().map(String::as_str)),
            _ => {}
        },
        Mq::V5(p) => match p {
            v5::Packet::Connect(c) => {
                out.push(&c.client_id);
                if let Some(w) = &c.last_will {
                    out.push(&w.topic);
                    if let Some(wp) = &w.properties {
                        out.extend(wp.content_type.as_deref());
                        out.extend(wp.response_topic.as_deref());
                        user(&wp.user_properties, &mut out);
                    }
                }
                if let Some(l) = &c.login {
                    out.push(&l.username);
                }
                if let Some(cp) = &c.properties {
                    out.extend(cp.authentication_method.as_deref());
                    user(&cp.user_properties, &mut out);
                }
            }
            v5::Packet::Publish(p) => {
                out.push(&p.topic);
                if let Some(pp) = &p.properties {
                    out.extend(pp.content_type.as_deref());
                    out.extend(pp.response_topic.as_deref());
                    user(&pp.user_properties, &mut out);
                }
            }
            v5::Packet::PubAck(a) => {
                if let Some(ap) = &a.properties {
                    out.extend(ap.reason_string.as_deref());
                    user(&ap.user_properties, &mut out);
                }
            }
            v5::Packet::PubRec(a) => {
                if let Some(ap) = &a.properties {
                    out.extend(ap.reason_string.as_deref());
                    user(&ap.user_properties, &mut out);
                }
            }
            v5::Packet::PubRel(a) => {
                if let Some(ap) = &a.properties {
                    out.extend(ap.reason_string.as_deref());
                    user(&ap.user_properties, &mut out);
                }
            }
            v5::Packet::PubComp(a) => {
                if let Some(ap) = &a.properties {
                    out.extend(ap.reason_string.as_deref());
                    user(&ap.user_properties, &mut out);
                }
            }
            v5::Packet::Subscribe(s) => {
                out.extend(s.filters.iter().map(|f| f.path.as_str()));
                if let Some(sp) = &s.properties {
                    user(&sp.user_properties, &mut out);
                }
            }
            v5::Packet::Unsubscribe(u) => {
                out.extend(u.filters.iter().map(String::as_str));
                if let Some(up) = &u.properties {
                    user(&up.user_properties, &mut out);
                }
            }
            v5::Packet::Disconnect(d) => {
                if let Some(dp) = &d.properties {
                    out.extend(dp.reason_string.as_deref());
                    out.extend(dp.server_reference.as_deref());
                    user(&dp.user_properties, &mut out);
                }
            }
            _ => {}
        },
    }
    out
}

/// The rule of the specification a packet that `mqttbytes` reads and writes breaks, if any:
/// `mqttbytes` does not check these, Tern's decoder must refuse them (docs/fuzzing.md).
fn spec_violation(p: &Mq, f: &Fields) -> Option<&'static str> {
    if strings(p).iter().any(|s| s.contains('\0')) {
        return Some("[MQTT-1.5.4-2] U+0000 in a UTF-8 string");
    }
    match f {
        Fields::Publish {
            dup: true, qos: 0, ..
        } => return Some("[MQTT-3.3.1-2] DUP set on a QoS 0 PUBLISH"),
        Fields::Ack { pkid: 0, .. }
        | Fields::Subscribe { pkid: 0, .. }
        | Fields::Unsubscribe { pkid: 0, .. } => return Some("[MQTT-2.3.1-1] packet identifier 0"),
        Fields::Subscribe { filters, .. } if filters.is_empty() => {
            return Some("[MQTT-3.8.3-3] SUBSCRIBE without topic filters")
        }
        Fields::Unsubscribe { filters, .. } if filters.is_empty() => {
            return Some("[MQTT-3.10.3-2] UNSUBSCRIBE without topic filters")
        }
        Fields::Subscribe { id: Some(0), .. } => {
            return Some("MQTT 5.0 3.8.2.1.2: Subscription Identifier 0")
        }
        Fields::Connect {
            level,
            will,
            username,
            password,
            props,
            ..
        } => {
            if *level == 4 && username.is_none() && password.is_some() {
                return Some("[MQTT-3.1.2-22] password without user name (3.1.1)");
            }
            if let Some(w) = will {
                if !is_topic_name(&w.topic) {
                    return Some(
                        "[MQTT-4.7.3-1] [MQTT-3.3.2-2] will topic is not a valid topic name",
                    );
                }
                if let Some(v) = message_violation(&w.props) {
                    return Some(v);
                }
            }
            if props.receive_maximum == Some(0) {
                return Some("MQTT 5.0 3.1.2.11.3: Receive Maximum 0");
            }
            if props.maximum_packet_size == Some(0) {
                return Some("MQTT 5.0 3.1.2.11.4: Maximum Packet Size 0");
            }
            if !flag_ok(props.request_response_information)
                || !flag_ok(props.request_problem_information)
            {
                return Some(
                    "MQTT 5.0 3.1.2.11.6/7: Request Response/Problem Information not 0 or 1",
                );
            }
        }
        Fields::Publish { props, .. } => {
            if let Some(v) = message_violation(props) {
                return Some(v);
            }
        }
        _ => {}
    }
    if let Mq::V5(v5::Packet::Publish(p)) = p {
        if p.properties
            .as_ref()
            .is_some_and(|p| !p.subscription_identifiers.is_empty())
        {
            return Some("[MQTT-3.3.4-6] Subscription Identifier in a client's PUBLISH");
        }
    }
    None
}

fn message_violation(p: &MessageProps) -> Option<&'static str> {
    if !flag_ok(p.payload_format) {
        return Some("MQTT 5.0 3.3.2.3.2: Payload Format Indicator not 0 or 1");
    }
    if p.response_topic
        .as_deref()
        .is_some_and(|t| !is_topic_name(t))
    {
        return Some("[MQTT-3.3.2-14] Response Topic is not a valid topic name");
    }
    None
}

/// Tern's decoder state for a packet at the front of `buf`: a CONNECT is read as the first
/// packet of a connection (its own version), anything else in the stream's version.
fn tern_version(buf: &[u8], v5: bool) -> Option<ProtocolVersion> {
    if buf.first().is_some_and(|b| b >> 4 == 1) {
        None
    } else if v5 {
        Some(ProtocolVersion::V5)
    } else {
        Some(ProtocolVersion::V3_1_1)
    }
}

fn show(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Tern first: the same-bytes check and (1). Returns the size Tern decoded, if it did.
fn tern_side(input: &BytesMut, v5: bool) -> Option<usize> {
    let mut tb = input.clone();
    let Ok(DecodeOutcome::Packet(tp, size)) = decode_packet(&mut tb, tern_version(input, v5), MAX)
    else {
        return None;
    };
    let frame = &input[..size];
    let version = match &tp {
        Packet::Connect(c) => c.version,
        _ if v5 => ProtocolVersion::V5,
        _ => ProtocolVersion::V3_1_1,
    };
    // Limitations of mqttbytes 0.6: no MQTT 3.1 (MQIsdp), no AUTH packet.
    if version == ProtocolVersion::V3_1 || matches!(tp, Packet::Auth(_)) {
        return Some(size);
    }
    let mv5 = version == ProtocolVersion::V5;
    let tf = from_tern(&tp);

    // Same bytes: mqttbytes must read what Tern accepted, to the same fields.
    let mut mb = BytesMut::from(frame);
    match Mq::read(&mut mb, mv5) {
        Ok(mp) => {
            assert!(
                mb.is_empty(),
                "framing differs: mqttbytes left {} of {size} bytes\n{}",
                mb.len(),
                show(frame)
            );
            let mf = mp.fields();
            assert_eq!(
                mf.as_ref(),
                Some(&tf),
                "same bytes, different fields (left mqttbytes, right Tern)\n{}",
                show(frame)
            );
        }
        Err(e) => {
            // Unless it is a documented limitation of mqttbytes (docs/fuzzing.md).
            if mqttbytes_refuses(&tp, mv5, frame).is_none() {
                panic!(
                    "Tern accepted, mqttbytes refused: {e:?}\nTern: {tf:?}\n{}",
                    show(frame)
                );
            }
        }
    }

    // (1) Tern's encoder writes it again; mqttbytes must read the same fields.
    let mut out = BytesMut::new();
    match &tp {
        Packet::Publish(p) => {
            let o = OutgoingPublish {
                topic: p.topic.as_bytes(),
                qos: p.qos,
                retain: p.retain,
                dup: p.dup,
                packet_id: p.packet_id,
                properties: &p.properties,
                extras: PublishExtras {
                    message_expiry_interval: p.properties.message_expiry_interval,
                    topic_alias: p.properties.topic_alias,
                    subscription_identifiers: &[],
                },
                payload: &p.payload,
            };
            encode_publish(&mut out, version, &o);
            assert_eq!(
                publish_size(version, &o),
                out.len(),
                "publish_size disagrees with encode_publish"
            );
        }
        Packet::PubAck(a) => encode_pub_response(&mut out, version, PUBACK, a.packet_id, a.reason),
        Packet::PubRec(a) => encode_pub_response(&mut out, version, PUBREC, a.packet_id, a.reason),
        Packet::PubRel(a) => encode_pub_response(&mut out, version, PUBREL, a.packet_id, a.reason),
        Packet::PubComp(a) => {
            encode_pub_response(&mut out, version, PUBCOMP, a.packet_id, a.reason)
        }
        // Tern writes a DISCONNECT only in 5.0, with a reason it sends and no Session Expiry.
        Packet::Disconnect(d) if mv5 && d.session_expiry_interval.is_none() => {
            match reason_code(d.reason) {
                Some(rc) => encode_disconnect(&mut out, rc, None),
                None => return Some(size),
            }
        }
        // Tern has no encoder for what only a client sends.
        _ => return Some(size),
    }
    let encoded = out.clone();
    match Mq::read(&mut out, mv5) {
        Ok(mp) => {
            assert!(
                out.is_empty(),
                "mqttbytes left {} bytes of Tern's encoding\n{}",
                out.len(),
                show(&encoded)
            );
            assert_eq!(mp.fields().as_ref(), Some(&tf), "Tern's encoding read back differently by mqttbytes (left mqttbytes, right Tern)\n{}", show(&encoded));
        }
        Err(e) => {
            if mqttbytes_refuses(&tp, mv5, &encoded).is_none() {
                panic!(
                    "mqttbytes refused Tern's encoding: {e:?}\nTern: {tf:?}\n{}",
                    show(&encoded)
                );
            }
        }
    }
    Some(size)
}

/// Every reason code Tern's `ReasonCode` names (the codes it sends).
const REASONS: &[ReasonCode] = &[
    ReasonCode::Success,
    ReasonCode::GrantedQoS1,
    ReasonCode::GrantedQoS2,
    ReasonCode::DisconnectWithWill,
    ReasonCode::NoMatchingSubscribers,
    ReasonCode::NoSubscriptionExisted,
    ReasonCode::UnspecifiedError,
    ReasonCode::MalformedPacket,
    ReasonCode::ProtocolError,
    ReasonCode::ImplementationSpecificError,
    ReasonCode::UnsupportedProtocolVersion,
    ReasonCode::ClientIdentifierNotValid,
    ReasonCode::BadUserNameOrPassword,
    ReasonCode::NotAuthorized,
    ReasonCode::ServerUnavailable,
    ReasonCode::ServerBusy,
    ReasonCode::ServerShuttingDown,
    ReasonCode::BadAuthenticationMethod,
    ReasonCode::KeepAliveTimeout,
    ReasonCode::SessionTakenOver,
    ReasonCode::TopicFilterInvalid,
    ReasonCode::TopicNameInvalid,
    ReasonCode::PacketIdentifierNotFound,
    ReasonCode::ReceiveMaximumExceeded,
    ReasonCode::TopicAliasInvalid,
    ReasonCode::PacketTooLarge,
    ReasonCode::QuotaExceeded,
    ReasonCode::PayloadFormatInvalid,
    ReasonCode::RetainNotSupported,
    ReasonCode::QoSNotSupported,
    ReasonCode::SharedSubscriptionsNotSupported,
];

fn reason_code(v: u8) -> Option<ReasonCode> {
    REASONS.iter().copied().find(|r| r.as_u8() == v)
}

/// Reason codes `mqttbytes`' v5 enums know, per packet (`v5::puback::reason` and friends).
fn mqttbytes_knows_reason(tp: &Packet, reason: u8) -> bool {
    match tp {
        Packet::PubAck(_) | Packet::PubRec(_) => {
            matches!(reason, 0 | 16 | 128 | 131 | 135 | 144 | 145 | 151 | 153)
        }
        Packet::PubRel(_) | Packet::PubComp(_) => matches!(reason, 0 | 146),
        Packet::Disconnect(_) => matches!(
            reason,
            0x00 | 0x04 | 0x80..=0x83 | 0x87 | 0x89 | 0x8B | 0x8D..=0x90 | 0x93..=0xA2
        ),
        _ => true,
    }
}

/// Remaining length of a whole frame (its fixed header's Variable Byte Integer may be longer
/// than needed in what `mqttbytes` accepts; Tern refuses that, [MQTT-1.5.5-1]).
fn body_len(frame: &[u8]) -> usize {
    let vbi = frame[1..].iter().take_while(|b| *b & 0x80 != 0).count() + 1;
    frame.len() - 1 - vbi
}

/// Why `mqttbytes` refuses a packet Tern accepted (or wrote), when that is one of its
/// documented limitations (docs/fuzzing.md); None for anything else.
fn mqttbytes_refuses(tp: &Packet, v5: bool, frame: &[u8]) -> Option<&'static str> {
    match tp {
        // v5 reason codes outside mqttbytes' enums (the spec allows more, and Tern reads any
        // reason byte of an acknowledgement or DISCONNECT).
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a)
            if v5 && !mqttbytes_knows_reason(tp, a.reason) =>
        {
            Some("reason code unknown to mqttbytes")
        }
        Packet::Disconnect(d) if v5 && !mqttbytes_knows_reason(tp, d.reason) => {
            Some("reason code unknown to mqttbytes")
        }
        // v5 DISCONNECT of remaining length 0 (reason 0x00) or 1 (reason only): allowed by
        // 3.14.2.1/3.14.2.2.1, but mqttbytes' v5::read wants a property length.
        Packet::Disconnect(_) if v5 && body_len(frame) <= 1 => Some("short v5 DISCONNECT"),
        // 3.1.1 CONNECT: mqttbytes reads the password as a UTF-8 string; it is binary data.
        Packet::Connect(c)
            if c.password
                .as_ref()
                .is_some_and(|p| std::str::from_utf8(p).is_err()) =>
        {
            Some("password is not UTF-8")
        }
        _ => None,
    }
}

/// mqttbytes first: (2). Returns the size mqttbytes decoded, if it did.
fn mqttbytes_side(input: &BytesMut, v5: bool) -> Option<usize> {
    let mut mb = input.clone();
    let mp = Mq::read(&mut mb, v5).ok()?;
    let size = input.len() - mb.len();
    // Server packets: Tern, a broker, does not decode them.
    let mf = mp.fields()?;
    // Each mqttbytes reader accepts a CONNECT of the other level without reading it as
    // that level (v4 skips 5.0's properties, v5 expects will properties in 3.1.1): only a
    // CONNECT of the stream's own version is compared.
    if let Fields::Connect { level, .. } = &mf {
        if *level != if v5 { 5 } else { 4 } {
            return Some(size);
        }
    }
    let mut out = BytesMut::new();
    if let Err(e) = mp.write(&mut out) {
        panic!(
            "mqttbytes cannot write what it read: {e:?}\n{mf:?}\n{}",
            show(&input[..size])
        );
    }
    // What mqttbytes' own encoding means to mqttbytes: the fields to compare with Tern.
    let mut again = out.clone();
    let Ok(mp2) = Mq::read(&mut again, v5) else {
        // mqttbytes cannot read back its own v5 DISCONNECT without properties (see
        // mqttbytes_refuses); nothing to compare with.
        if matches!(mf, Fields::Disconnect { .. }) && v5 && out.len() <= 3 {
            return Some(size);
        }
        panic!(
            "mqttbytes cannot read what it wrote\n{mf:?}\n{}",
            show(&out)
        );
    };
    let Some(mf2) = mp2.fields() else {
        panic!(
            "mqttbytes read its client packet back as a server packet\n{}",
            show(&out)
        );
    };
    let violation = spec_violation(&mp2, &mf2);
    let encoded = out.clone();
    match decode_packet(&mut out, tern_version(&encoded, v5), MAX) {
        Ok(DecodeOutcome::Packet(tp, n)) => {
            assert_eq!(
                n,
                encoded.len(),
                "Tern took {n} of {} bytes\n{}",
                encoded.len(),
                show(&encoded)
            );
            if let Some(rule) = violation {
                panic!(
                    "Tern accepted a packet that breaks {rule}\n{mf2:?}\n{}",
                    show(&encoded)
                );
            }
            assert_eq!(
                from_tern(&tp),
                mf2,
                "mqttbytes' encoding read differently by Tern (left Tern, right mqttbytes)\n{}",
                show(&encoded)
            );
        }
        Ok(DecodeOutcome::Incomplete(n)) => {
            panic!(
                "Tern wants more of mqttbytes' whole packet ({n:?})\n{}",
                show(&encoded)
            )
        }
        Err(e) => {
            if violation.is_none() {
                panic!(
                    "Tern refused mqttbytes' packet: {e}\n{mf2:?}\n{}",
                    show(&encoded)
                );
            }
        }
    }
    Some(size)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let v5 = selector % 2 == 1;
    let mut buf = BytesMut::from(rest);
    // Every decoded packet takes at least its two-byte fixed header.
    while !buf.is_empty() {
        let t = tern_side(&buf, v5);
        let m = mqttbytes_side(&buf, v5);
        if let (Some(a), Some(b)) = (t, m) {
            assert_eq!(
                a,
                b,
                "Tern and mqttbytes frame the packet differently\n{}",
                show(&buf[..a.max(b)])
            );
        }
        match t.or(m) {
            Some(n) => buf.advance(n),
            None => break,
        }
    }
});
