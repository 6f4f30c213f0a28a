//! Tern's codec against `mqttbytes` (crates.io 0.6.0), an independent implementation: for
//! packets both can express, what one encodes the other decodes to the same fields.
//!
//! - client → broker: `mqttbytes` encodes PUBLISH, SUBSCRIBE, UNSUBSCRIBE and the four
//!   acknowledgements (3.1.1 and 5.0); Tern's `decode_packet` must read the same fields;
//! - broker → client: Tern encodes PUBLISH, the acknowledgements, SUBACK and UNSUBACK;
//!   `mqttbytes` must read the same fields.
//!
//! Known `mqttbytes` limitations, kept out of the generators (each noted where it applies):
//! it has no MQTT 3.1; its v5 reason-code enums reject codes the spec allows in some packets;
//! it cannot express a v5 Subscription Identifier in SUBSCRIBE's properties through a public
//! constructor. A disagreement outside those is a bug on one side, shown with the packet.

use super::*;
use bytes::BytesMut;
use mqttbytes::{v4, v5};
use proptest::prelude::*;

fn qos_of(q: u8) -> (QoS, mqttbytes::QoS) {
    match q % 3 {
        0 => (QoS::AtMostOnce, mqttbytes::QoS::AtMostOnce),
        1 => (QoS::AtLeastOnce, mqttbytes::QoS::AtLeastOnce),
        _ => (QoS::ExactlyOnce, mqttbytes::QoS::ExactlyOnce),
    }
}

/// Topic names both accept: 1-3 levels of printable ASCII without wildcards.
fn topic() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-zA-Z0-9_-]{1,8}", 1..4).prop_map(|l| l.join("/"))
}

fn filter() -> impl Strategy<Value = String> {
    proptest::collection::vec(prop_oneof!["[a-z0-9]{1,6}", Just("+".to_string())], 1..4)
        .prop_flat_map(|levels| {
            let f = levels.join("/");
            prop_oneof![Just(f.clone()), Just(format!("{f}/#"))]
        })
}

fn decode_one(mut buf: BytesMut, v5: bool) -> Packet {
    let version = if v5 {
        ProtocolVersion::V5
    } else {
        ProtocolVersion::V3_1_1
    };
    match decode_packet(&mut buf, Some(version), 1 << 20) {
        Ok(DecodeOutcome::Packet(p, n)) => {
            assert!(buf.is_empty(), "{n} bytes decoded, {} left over", buf.len());
            p
        }
        other => panic!("Tern did not decode mqttbytes' packet: {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// mqttbytes PUBLISH → Tern.
    #[test]
    fn publish_from_mqttbytes(
        v5 in any::<bool>(), q in 0u8..3, retain in any::<bool>(), dup in any::<bool>(),
        pid in 1u16.., topic in topic(), payload in proptest::collection::vec(any::<u8>(), 0..300),
        expiry in proptest::option::of(1u32..100_000),
    ) {
        let (qos, mq) = qos_of(q);
        let dup = dup && qos != QoS::AtMostOnce;
        let pid = if qos == QoS::AtMostOnce { 0 } else { pid };
        let mut buf = BytesMut::new();
        if v5 {
            let mut p = v5::Publish::new(topic.clone(), mq, payload.clone());
            p.retain = retain;
            p.dup = dup;
            p.pkid = pid;
            p.properties = expiry.map(|e| v5::PublishProperties {
                payload_format_indicator: None,
                message_expiry_interval: Some(e),
                topic_alias: None,
                response_topic: None,
                correlation_data: None,
                user_properties: Vec::new(),
                subscription_identifiers: Vec::new(),
                content_type: None,
            });
            p.write(&mut buf).expect("encode");
        } else {
            let mut p = v4::Publish::new(topic.clone(), mq, payload.clone());
            p.retain = retain;
            p.dup = dup;
            p.pkid = pid;
            p.write(&mut buf).expect("encode");
        }
        let Packet::Publish(p) = decode_one(buf, v5) else { panic!("not a PUBLISH") };
        prop_assert_eq!(p.topic.as_str(), topic.as_str());
        prop_assert_eq!(p.qos, qos);
        prop_assert_eq!(p.retain, retain);
        prop_assert_eq!(p.dup, dup);
        prop_assert_eq!(p.packet_id, pid);
        prop_assert_eq!(&p.payload[..], &payload[..]);
        prop_assert_eq!(p.properties.message_expiry_interval, if v5 { expiry } else { None });
    }

    /// Tern PUBLISH → mqttbytes.
    #[test]
    fn publish_to_mqttbytes(
        v5 in any::<bool>(), q in 0u8..3, retain in any::<bool>(), dup in any::<bool>(),
        pid in 1u16.., topic in topic(), payload in proptest::collection::vec(any::<u8>(), 0..300),
        expiry in proptest::option::of(1u32..100_000),
    ) {
        let (qos, mq) = qos_of(q);
        let dup = dup && qos != QoS::AtMostOnce;
        let pid = if qos == QoS::AtMostOnce { 0 } else { pid };
        let version = if v5 { ProtocolVersion::V5 } else { ProtocolVersion::V3_1_1 };
        let props = PublishProperties::default();
        let out = OutgoingPublish {
            topic: topic.as_bytes(),
            qos,
            retain,
            dup,
            packet_id: pid,
            properties: &props,
            extras: PublishExtras {
                message_expiry_interval: expiry,
                topic_alias: None,
                subscription_identifiers: &[],
            },
            payload: &payload,
        };
        let mut buf = BytesMut::new();
        encode_publish(&mut buf, version, &out);
        prop_assert_eq!(publish_size(version, &out), buf.len());
        if v5 {
            let v5::Packet::Publish(p) = v5::read(&mut buf, 1 << 20).expect("mqttbytes reads it") else {
                panic!("not a PUBLISH")
            };
            prop_assert_eq!(&p.topic, &topic);
            prop_assert_eq!(p.qos, mq);
            prop_assert_eq!((p.retain, p.dup, p.pkid), (retain, dup, pid));
            prop_assert_eq!(&p.payload[..], &payload[..]);
            prop_assert_eq!(p.properties.and_then(|p| p.message_expiry_interval), expiry);
        } else {
            let v4::Packet::Publish(p) = v4::read(&mut buf, 1 << 20).expect("mqttbytes reads it") else {
                panic!("not a PUBLISH")
            };
            prop_assert_eq!(&p.topic, &topic);
            prop_assert_eq!(p.qos, mq);
            prop_assert_eq!((p.retain, p.dup, p.pkid), (retain, dup, pid));
            prop_assert_eq!(&p.payload[..], &payload[..]);
        }
        prop_assert!(buf.is_empty());
    }

    /// mqttbytes SUBSCRIBE / UNSUBSCRIBE → Tern.
    #[test]
    fn subscribe_from_mqttbytes(
        v5 in any::<bool>(), pid in 1u16..,
        filters in proptest::collection::vec((filter(), 0u8..3), 1..5),
    ) {
        let mut buf = BytesMut::new();
        if v5 {
            let mut s = v5::Subscribe::new_many(filters.iter().map(|(f, q)| {
                v5::SubscribeFilter::new(f.clone(), qos_of(*q).1)
            }));
            s.pkid = pid;
            s.write(&mut buf).expect("encode");
        } else {
            let mut s = v4::Subscribe::new_many(filters.iter().map(|(f, q)| {
                v4::SubscribeFilter::new(f.clone(), qos_of(*q).1)
            }));
            s.pkid = pid;
            s.write(&mut buf).expect("encode");
        }
        let Packet::Subscribe(s) = decode_one(buf, v5) else { panic!("not a SUBSCRIBE") };
        prop_assert_eq!(s.packet_id, pid);
        prop_assert_eq!(s.filters.len(), filters.len());
        for ((f, o), (ef, eq)) in s.filters.iter().zip(&filters) {
            prop_assert_eq!(f.as_str(), ef.as_str());
            prop_assert_eq!(o.qos, qos_of(*eq).0);
        }

        let mut buf = BytesMut::new();
        let names: Vec<String> = filters.iter().map(|(f, _)| f.clone()).collect();
        if v5 {
            let mut u = v5::Unsubscribe::new(names[0].clone());
            u.filters = names.clone();
            u.pkid = pid;
            u.write(&mut buf).expect("encode");
        } else {
            let mut u = v4::Unsubscribe::new(names[0].clone());
            u.topics = names.clone();
            u.pkid = pid;
            u.write(&mut buf).expect("encode");
        }
        let Packet::Unsubscribe(u) = decode_one(buf, v5) else { panic!("not an UNSUBSCRIBE") };
        prop_assert_eq!(u.packet_id, pid);
        let got: Vec<&str> = u.filters.iter().map(|f| f.as_str()).collect();
        let want: Vec<&str> = names.iter().map(String::as_str).collect();
        prop_assert_eq!(got, want);
    }

    /// Acknowledgements both ways (reason 0; 3.1.1 has none).
    #[test]
    fn acks_both_ways(v5 in any::<bool>(), pid in 1u16.., kind_ix in 0usize..4) {
        let kinds = [PUBACK, PUBREC, PUBREL, PUBCOMP];
        let k = kinds[kind_ix];
        let version = if v5 { ProtocolVersion::V5 } else { ProtocolVersion::V3_1_1 };
        // Tern → mqttbytes.
        let mut buf = BytesMut::new();
        encode_pub_response(&mut buf, version, k, pid, 0);
        let got = if v5 {
            match v5::read(&mut buf, 1 << 20).expect("mqttbytes reads it") {
                v5::Packet::PubAck(a) => (PUBACK, a.pkid),
                v5::Packet::PubRec(a) => (PUBREC, a.pkid),
                v5::Packet::PubRel(a) => (PUBREL, a.pkid),
                v5::Packet::PubComp(a) => (PUBCOMP, a.pkid),
                other => panic!("{other:?}"),
            }
        } else {
            match v4::read(&mut buf, 1 << 20).expect("mqttbytes reads it") {
                v4::Packet::PubAck(a) => (PUBACK, a.pkid),
                v4::Packet::PubRec(a) => (PUBREC, a.pkid),
                v4::Packet::PubRel(a) => (PUBREL, a.pkid),
                v4::Packet::PubComp(a) => (PUBCOMP, a.pkid),
                other => panic!("{other:?}"),
            }
        };
        prop_assert_eq!(got, (k, pid));
        // mqttbytes → Tern.
        let mut buf = BytesMut::new();
        match (k, v5) {
            (PUBACK, true) => { v5::PubAck::new(pid).write(&mut buf).expect("encode"); }
            (PUBREC, true) => { v5::PubRec::new(pid).write(&mut buf).expect("encode"); }
            (PUBREL, true) => { v5::PubRel::new(pid).write(&mut buf).expect("encode"); }
            (_, true) => { v5::PubComp::new(pid).write(&mut buf).expect("encode"); }
            (PUBACK, false) => { v4::PubAck::new(pid).write(&mut buf).expect("encode"); }
            (PUBREC, false) => { v4::PubRec::new(pid).write(&mut buf).expect("encode"); }
            (PUBREL, false) => { v4::PubRel::new(pid).write(&mut buf).expect("encode"); }
            (_, false) => { v4::PubComp::new(pid).write(&mut buf).expect("encode"); }
        }
        let (pk, a) = match decode_one(buf, v5) {
            Packet::PubAck(a) => (PUBACK, a),
            Packet::PubRec(a) => (PUBREC, a),
            Packet::PubRel(a) => (PUBREL, a),
            Packet::PubComp(a) => (PUBCOMP, a),
            other => panic!("{other:?}"),
        };
        prop_assert_eq!((pk, a.packet_id, a.reason), (k, pid, 0));
    }

    /// Tern SUBACK / UNSUBACK → mqttbytes (granted QoS; 3.1.1 failure 0x80).
    #[test]
    fn suback_to_mqttbytes(v5 in any::<bool>(), pid in 1u16.., codes in proptest::collection::vec(0u8..4, 1..6)) {
        // 3 stands for a refusal: 0x80 in 3.1.1, 0x87 (Not authorized) in 5.0.
        let codes: Vec<u8> = codes.iter().map(|&c| if c == 3 { if v5 { 0x87 } else { 0x80 } } else { c }).collect();
        let version = if v5 { ProtocolVersion::V5 } else { ProtocolVersion::V3_1_1 };
        let mut buf = BytesMut::new();
        encode_suback(&mut buf, version, pid, &codes);
        if v5 {
            let v5::Packet::SubAck(s) = v5::read(&mut buf, 1 << 20).expect("mqttbytes reads it") else { panic!() };
            prop_assert_eq!(s.pkid, pid);
            let got: Vec<u8> = s.return_codes.iter().map(|c| *c as u8).collect();
            prop_assert_eq!(&got, &codes);
        } else {
            let v4::Packet::SubAck(s) = v4::read(&mut buf, 1 << 20).expect("mqttbytes reads it") else { panic!() };
            prop_assert_eq!(s.pkid, pid);
            let got: Vec<u8> = s.return_codes.iter().map(|c| match c {
                v4::SubscribeReasonCode::Success(q) => *q as u8,
                v4::SubscribeReasonCode::Failure => 0x80,
            }).collect();
            prop_assert_eq!(&got, &codes);
        }
        let mut buf = BytesMut::new();
        let un: Vec<u8> = vec![0; codes.len()];
        encode_unsuback(&mut buf, version, pid, &un);
        if v5 {
            let v5::Packet::UnsubAck(u) = v5::read(&mut buf, 1 << 20).expect("mqttbytes reads it") else { panic!() };
            prop_assert_eq!(u.pkid, pid);
            prop_assert_eq!(u.reasons.len(), un.len());
        } else {
            let v4::Packet::UnsubAck(u) = v4::read(&mut buf, 1 << 20).expect("mqttbytes reads it") else { panic!() };
            prop_assert_eq!(u.pkid, pid);
        }
    }

    /// mqttbytes CONNECT → Tern (decoded without a version: CONNECT carries its own).
    #[test]
    fn connect_from_mqttbytes(
        v5 in any::<bool>(), id in "[a-zA-Z0-9]{1,23}", keep_alive in any::<u16>(),
        clean in any::<bool>(), login in proptest::option::of(("[a-z]{1,8}", "[a-z0-9]{1,12}")),
        will in proptest::option::of((topic(), proptest::collection::vec(any::<u8>(), 0..40), 0u8..3, any::<bool>())),
        expiry in proptest::option::of(any::<u32>()),
    ) {
        let mut buf = BytesMut::new();
        if v5 {
            let mut c = v5::Connect::new(id.clone());
            c.keep_alive = keep_alive;
            c.clean_session = clean;
            if let Some((u, p)) = &login {
                c.set_login(u.clone(), p.clone());
            }
            if let Some((t, m, q, r)) = &will {
                c.last_will = Some(v5::LastWill::new(t.clone(), m.clone(), qos_of(*q).1, *r));
            }
            c.properties = Some(super::test_support::v5_connect_properties(expiry, None));
            c.write(&mut buf).expect("encode");
        } else {
            let mut c = v4::Connect::new(id.clone());
            c.keep_alive = keep_alive;
            c.clean_session = clean;
            if let Some((u, p)) = &login {
                c.set_login(u.clone(), p.clone());
            }
            if let Some((t, m, q, r)) = &will {
                c.last_will = Some(v4::LastWill::new(t.clone(), m.clone(), qos_of(*q).1, *r));
            }
            c.write(&mut buf).expect("encode");
        }
        let Ok(DecodeOutcome::Packet(Packet::Connect(c), _)) = decode_packet(&mut buf, None, 1 << 20) else {
            panic!("Tern did not decode mqttbytes' CONNECT")
        };
        prop_assert!(buf.is_empty());
        prop_assert_eq!(c.version, if v5 { ProtocolVersion::V5 } else { ProtocolVersion::V3_1_1 });
        prop_assert_eq!(c.client_id.as_str(), id.as_str());
        prop_assert_eq!((c.keep_alive, c.clean_start), (keep_alive, clean));
        prop_assert_eq!(c.username.as_ref().map(|u| u.as_str().to_string()), login.as_ref().map(|l| l.0.clone()));
        prop_assert_eq!(c.password.as_ref().map(|p| p.to_vec()), login.as_ref().map(|l| l.1.as_bytes().to_vec()));
        match (&c.will, &will) {
            (None, None) => {}
            (Some(w), Some((t, m, q, r))) => {
                prop_assert_eq!(w.topic.as_str(), t.as_str());
                prop_assert_eq!(&w.payload[..], &m[..]);
                prop_assert_eq!((w.qos, w.retain), (qos_of(*q).0, *r));
            }
            (a, b) => prop_assert!(false, "will {:?} vs {:?}", a, b),
        }
        if v5 {
            prop_assert_eq!(c.properties.session_expiry_interval, expiry);
        }
    }
}
