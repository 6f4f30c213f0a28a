//! The client core against a remote broker played by the test through `mqttbytes` (an
//! independent codec): what the core writes is decoded by `mqttbytes`, what the "broker"
//! answers is encoded by it. Time is moved by hand. Each behaviour runs for 3.1.1 and 5.0
//! where both have it.

use super::*;
use mqttbytes::{v4, v5};

const T0: Duration = Duration::from_secs(0);

/// What the core sent, in `mqttbytes` terms common to both versions.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Connect {
        client_id: String,
        keep_alive: u16,
        clean: bool,
        login: Option<(String, String)>,
        session_expiry: Option<u32>,
        receive_maximum: Option<u16>,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8, bool)>,
    },
    Publish {
        pkid: u16,
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
        dup: bool,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    PingReq,
    Disconnect(u8),
}

fn q(qos: mqttbytes::QoS) -> u8 {
    qos as u8
}

fn mq(qos: u8) -> mqttbytes::QoS {
    match qos {
        0 => mqttbytes::QoS::AtMostOnce,
        1 => mqttbytes::QoS::AtLeastOnce,
        _ => mqttbytes::QoS::ExactlyOnce,
    }
}

struct Remote {
    v5: bool,
    start: Instant,
    core: ClientCore,
}

fn opts(v5: bool) -> LinkOptions {
    let version = if v5 {
        ProtocolVersion::V5
    } else {
        ProtocolVersion::V3_1_1
    };
    let mut o = LinkOptions::new(version, "bridge-1");
    o.keep_alive = Duration::from_secs(10);
    o.window = 3;
    o
}

impl Remote {
    fn new(opts: &LinkOptions) -> Remote {
        let start = Instant::now();
        Remote {
            v5: opts.version.is_v5(),
            start,
            core: ClientCore::new(opts, start),
        }
    }

    fn at(&self, d: Duration) -> Instant {
        self.start + d
    }

    /// Everything the core has written, decoded by `mqttbytes`.
    fn got(&mut self) -> Vec<Got> {
        let mut buf = BytesMut::new();
        while let Some(b) = self.core.poll_transmit() {
            buf.extend_from_slice(&b);
        }
        let mut out = Vec::new();
        while !buf.is_empty() {
            out.push(if self.v5 {
                match v5::read(&mut buf, 1 << 20).expect("mqttbytes reads the core's packet") {
                    v5::Packet::Connect(c) => Got::Connect {
                        client_id: c.client_id,
                        keep_alive: c.keep_alive,
                        clean: c.clean_session,
                        login: c.login.map(|l| (l.username, l.password)),
                        session_expiry: c
                            .properties
                            .as_ref()
                            .and_then(|p| p.session_expiry_interval),
                        receive_maximum: c.properties.as_ref().and_then(|p| p.receive_maximum),
                    },
                    v5::Packet::Subscribe(s) => Got::Subscribe {
                        pkid: s.pkid,
                        filters: s
                            .filters
                            .into_iter()
                            .map(|f| (f.path, q(f.qos), f.nolocal))
                            .collect(),
                    },
                    v5::Packet::Publish(p) => Got::Publish {
                        pkid: p.pkid,
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        qos: q(p.qos),
                        retain: p.retain,
                        dup: p.dup,
                    },
                    v5::Packet::PubAck(a) => Got::PubAck(a.pkid),
                    v5::Packet::PubRec(a) => Got::PubRec(a.pkid),
                    v5::Packet::PubRel(a) => Got::PubRel(a.pkid),
                    v5::Packet::PubComp(a) => Got::PubComp(a.pkid),
                    v5::Packet::PingReq => Got::PingReq,
                    v5::Packet::Disconnect(d) => Got::Disconnect(d.reason_code as u8),
                    other => panic!("unexpected from the client: {other:?}"),
                }
            } else {
                match v4::read(&mut buf, 1 << 20).expect("mqttbytes reads the core's packet") {
                    v4::Packet::Connect(c) => Got::Connect {
                        client_id: c.client_id,
                        keep_alive: c.keep_alive,
                        clean: c.clean_session,
                        login: c.login.map(|l| (l.username, l.password)),
                        session_expiry: None,
                        receive_maximum: None,
                    },
                    v4::Packet::Subscribe(s) => Got::Subscribe {
                        pkid: s.pkid,
                        filters: s
                            .filters
                            .into_iter()
                            .map(|f| (f.path, q(f.qos), false))
                            .collect(),
                    },
                    v4::Packet::Publish(p) => Got::Publish {
                        pkid: p.pkid,
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        qos: q(p.qos),
                        retain: p.retain,
                        dup: p.dup,
                    },
                    v4::Packet::PubAck(a) => Got::PubAck(a.pkid),
                    v4::Packet::PubRec(a) => Got::PubRec(a.pkid),
                    v4::Packet::PubRel(a) => Got::PubRel(a.pkid),
                    v4::Packet::PubComp(a) => Got::PubComp(a.pkid),
                    v4::Packet::PingReq => Got::PingReq,
                    v4::Packet::Disconnect => Got::Disconnect(0),
                    other => panic!("unexpected from the client: {other:?}"),
                }
            });
        }
        out
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.core.poll_event()).collect()
    }

    fn feed(&mut self, mut bytes: BytesMut, at: Duration) {
        let now = self.at(at);
        self.core.handle_input(&mut bytes, now);
    }

    fn connack(&mut self, session_present: bool, props: Option<v5::ConnAckProperties>) {
        let mut b = BytesMut::new();
        if self.v5 {
            let mut c = v5::ConnAck::new(v5::ConnectReturnCode::Success, session_present);
            c.properties = props;
            c.write(&mut b).unwrap();
        } else {
            v4::ConnAck::new(v4::ConnectReturnCode::Success, session_present)
                .write(&mut b)
                .unwrap();
        }
        self.feed(b, T0);
    }

    /// CONNECT read, CONNACK (success) answered, `Connected` seen.
    fn connected(opts: &LinkOptions) -> Remote {
        let mut r = Remote::new(opts);
        assert!(matches!(r.got()[..], [Got::Connect { .. }]));
        r.connack(false, None);
        let ev = r.events();
        assert!(
            matches!(
                ev[..],
                [Event::Connected {
                    session_present: false
                }]
            ),
            "{ev:?}"
        );
        r
    }

    fn publish(&mut self, token: u64, qos: QoS) -> Result<(), PublishError> {
        let now = self.at(T0);
        self.core.publish(
            token,
            "up/t",
            b"payload",
            qos,
            false,
            &PublishProperties::default(),
            false,
            now,
        )
    }

    fn ack(&mut self, kind: u8, pkid: u16, reason: u8) {
        let mut b = BytesMut::new();
        if self.v5 {
            match kind {
                4 => {
                    let mut a = v5::PubAck::new(pkid);
                    if reason == 0x87 {
                        a.reason = v5::PubAckReason::NotAuthorized;
                    }
                    a.write(&mut b).unwrap();
                }
                5 => {
                    let mut a = v5::PubRec::new(pkid);
                    if reason == 0x87 {
                        a.reason = v5::PubRecReason::NotAuthorized;
                    }
                    a.write(&mut b).unwrap();
                }
                6 => {
                    v5::PubRel::new(pkid).write(&mut b).unwrap();
                }
                _ => {
                    v5::PubComp::new(pkid).write(&mut b).unwrap();
                }
            }
        } else {
            match kind {
                4 => v4::PubAck::new(pkid).write(&mut b).unwrap(),
                5 => v4::PubRec::new(pkid).write(&mut b).unwrap(),
                6 => v4::PubRel::new(pkid).write(&mut b).unwrap(),
                _ => v4::PubComp::new(pkid).write(&mut b).unwrap(),
            };
        }
        self.feed(b, T0);
    }

    fn send_publish(&mut self, topic: &str, qos: u8, pkid: u16, dup: bool) {
        let mut b = BytesMut::new();
        if self.v5 {
            let mut p = v5::Publish::new(topic, mq(qos), b"down".to_vec());
            p.pkid = pkid;
            p.dup = dup;
            p.write(&mut b).unwrap();
        } else {
            let mut p = v4::Publish::new(topic, mq(qos), b"down".to_vec());
            p.pkid = pkid;
            p.dup = dup;
            p.write(&mut b).unwrap();
        }
        self.feed(b, T0);
    }
}

fn both(test: impl Fn(bool)) {
    test(false);
    test(true);
}

#[test]
fn connect_carries_the_options() {
    both(|v5| {
        let mut o = opts(v5);
        o.clean_start = false;
        o.session_expiry = 600;
        o.inbound_window = 7;
        o.username = Some("u".into());
        o.password = Some(Bytes::from_static(b"p"));
        let mut r = Remote::new(&o);
        assert_eq!(
            r.got(),
            vec![Got::Connect {
                client_id: "bridge-1".into(),
                keep_alive: 10,
                clean: false,
                login: Some(("u".into(), "p".into())),
                session_expiry: v5.then_some(600),
                receive_maximum: v5.then_some(7),
            }]
        );
        assert_eq!(r.core.room(), 0, "no room before CONNACK");
        assert_eq!(
            r.publish(1, QoS::AtLeastOnce),
            Err(PublishError::NotConnected)
        );
        r.connack(true, None);
        assert!(matches!(
            r.events()[..],
            [Event::Connected {
                session_present: true
            }]
        ));
        assert_eq!(r.core.room(), 3);
    });
}

#[test]
fn refused_connect_is_a_typed_close() {
    both(|v5| {
        let mut r = Remote::new(&opts(v5));
        r.got();
        let mut b = BytesMut::new();
        if v5 {
            v5::ConnAck::new(v5::ConnectReturnCode::NotAuthorized, false)
                .write(&mut b)
                .unwrap();
        } else {
            v4::ConnAck::new(v4::ConnectReturnCode::BadUserNamePassword, false)
                .write(&mut b)
                .unwrap();
        }
        r.feed(b, T0);
        let ev = r.events();
        let [Event::Closed(reason)] = &ev[..] else {
            panic!("{ev:?}")
        };
        let want = if v5 {
            ReasonCode::NotAuthorized
        } else {
            ReasonCode::BadUserNameOrPassword
        };
        assert_eq!(
            reason,
            &CloseReason::Refused {
                reason: want.as_u8()
            }
        );
        assert_eq!(reason.reason_code(), Some(want));
        assert!(r.core.is_closed());
        assert!(r.got().is_empty(), "no DISCONNECT after a refusal");
    });
}

#[test]
fn first_packet_must_be_connack() {
    both(|v5| {
        let mut r = Remote::new(&opts(v5));
        r.got();
        r.send_publish("a", 0, 0, false);
        assert!(matches!(
            r.events()[..],
            [Event::Closed(CloseReason::Protocol(_))]
        ));
    });
}

#[test]
fn connack_timeout() {
    let mut r = Remote::new(&opts(true));
    r.got();
    let deadline = r.core.next_timer().unwrap();
    assert_eq!(deadline, r.at(Duration::from_secs(10)));
    r.core.handle_timer(r.at(Duration::from_secs(9)));
    assert!(r.events().is_empty());
    r.core.handle_timer(deadline);
    assert!(matches!(
        r.events()[..],
        [Event::Closed(CloseReason::ConnackTimeout)]
    ));
}

#[test]
fn window_is_respected_and_qos1_acks_map_to_tokens() {
    both(|v5| {
        let mut r = Remote::connected(&opts(v5));
        for token in 10..13 {
            r.publish(token, QoS::AtLeastOnce).unwrap();
        }
        assert_eq!(r.core.room(), 0);
        assert_eq!(r.publish(13, QoS::AtLeastOnce), Err(PublishError::Full));
        let got = r.got();
        let ids: Vec<u16> = got
            .iter()
            .map(|g| match g {
                Got::Publish {
                    pkid,
                    qos: 1,
                    dup: false,
                    topic,
                    ..
                } if topic == "up/t" => *pkid,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids.len(), 3);
        // Acknowledged out of order: each PUBACK completes its own token.
        r.ack(4, ids[1], 0);
        assert!(matches!(
            r.events()[..],
            [Event::Acked {
                token: 11,
                reason: 0
            }]
        ));
        assert_eq!(r.core.room(), 1);
        r.publish(13, QoS::AtLeastOnce).unwrap();
        let Got::Publish { pkid, .. } = r.got()[0].clone() else {
            panic!()
        };
        assert!(
            !ids.contains(&pkid) || pkid == ids[1],
            "id {pkid} reused while in flight"
        );
        r.ack(4, ids[0], 0);
        r.ack(4, ids[2], 0);
        r.ack(4, pkid, 0);
        let tokens: Vec<u64> = r
            .events()
            .into_iter()
            .map(|e| match e {
                Event::Acked { token, .. } => token,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(tokens, vec![10, 12, 13]);
        assert_eq!(r.core.room(), 3);
        // A late duplicate PUBACK is ignored.
        r.ack(4, ids[0], 0);
        assert!(r.events().is_empty());
    });
}

#[test]
fn qos0_completes_at_once_and_takes_no_window() {
    both(|v5| {
        let mut r = Remote::connected(&opts(v5));
        for token in 0..10 {
            r.publish(token, QoS::AtMostOnce).unwrap();
        }
        assert_eq!(r.events().len(), 10);
        assert_eq!(r.got().len(), 10);
        assert_eq!(r.core.room(), 3);
    });
}

#[test]
fn qos2_acked_after_pubcomp() {
    both(|v5| {
        let mut r = Remote::connected(&opts(v5));
        r.publish(7, QoS::ExactlyOnce).unwrap();
        let [Got::Publish { pkid, qos: 2, .. }] = r.got()[..] else {
            panic!()
        };
        r.ack(5, pkid, 0);
        assert_eq!(r.got(), vec![Got::PubRel(pkid)]);
        assert!(r.events().is_empty(), "not done at PUBREC");
        assert_eq!(r.core.room(), 2, "still in flight until PUBCOMP");
        r.ack(7, pkid, 0);
        assert!(matches!(
            r.events()[..],
            [Event::Acked {
                token: 7,
                reason: 0
            }]
        ));
        assert_eq!(r.core.room(), 3);
    });
}

#[test]
fn v5_refusing_pubrec_and_puback_end_the_publish_with_their_reason() {
    let mut r = Remote::connected(&opts(true));
    r.publish(1, QoS::ExactlyOnce).unwrap();
    r.publish(2, QoS::AtLeastOnce).unwrap();
    let got = r.got();
    let (Got::Publish { pkid: a, .. }, Got::Publish { pkid: b, .. }) = (&got[0], &got[1]) else {
        panic!()
    };
    r.ack(5, *a, 0x87);
    r.ack(4, *b, 0x87);
    assert!(r.got().is_empty(), "no PUBREL after a refusing PUBREC");
    let ev = r.events();
    assert!(
        matches!(
            ev[..],
            [
                Event::Acked {
                    token: 1,
                    reason: 0x87
                },
                Event::Acked {
                    token: 2,
                    reason: 0x87
                }
            ]
        ),
        "{ev:?}"
    );
}

#[test]
fn v5_receive_maximum_caps_the_window_and_maximum_qos_and_packet_size_apply() {
    let mut o = opts(true);
    o.window = 100;
    let mut r = Remote::new(&o);
    r.got();
    let mut props = v5::ConnAckProperties::new();
    props.receive_max = Some(2);
    props.max_qos = Some(1);
    props.max_packet_size = Some(40);
    props.retain_available = Some(0);
    r.connack(false, Some(props));
    r.events();
    assert_eq!(r.core.window(), 2);
    assert_eq!(r.core.room(), 2);
    let now = r.at(T0);
    r.core
        .publish(
            1,
            "t",
            b"x",
            QoS::ExactlyOnce,
            true,
            &PublishProperties::default(),
            false,
            now,
        )
        .unwrap();
    assert!(matches!(
        r.got()[..],
        [Got::Publish {
            qos: 1,
            retain: false,
            ..
        }]
    ));
    let big = vec![0u8; 64];
    assert!(matches!(
        r.core.publish(
            2,
            "t",
            &big,
            QoS::AtLeastOnce,
            false,
            &PublishProperties::default(),
            false,
            now
        ),
        Err(PublishError::TooLarge { max: 40, .. })
    ));
    assert_eq!(
        r.core.publish(
            3,
            "a/+",
            b"x",
            QoS::AtLeastOnce,
            false,
            &PublishProperties::default(),
            false,
            now
        ),
        Err(PublishError::TopicInvalid)
    );
}

#[test]
fn resend_carries_dup() {
    both(|v5| {
        let mut r = Remote::connected(&opts(v5));
        let now = r.at(T0);
        r.core
            .publish(
                1,
                "t",
                b"x",
                QoS::AtLeastOnce,
                false,
                &PublishProperties::default(),
                true,
                now,
            )
            .unwrap();
        assert!(matches!(r.got()[..], [Got::Publish { dup: true, .. }]));
    });
}

#[test]
fn subscribe_after_connack_with_no_local_in_v5_and_refusals_as_events() {
    both(|v5| {
        let mut o = opts(v5);
        o.subscriptions = vec![
            Subscription {
                filter: "down/#".into(),
                qos: QoS::AtLeastOnce,
                no_local: true,
            },
            Subscription {
                filter: "secret/#".into(),
                qos: QoS::ExactlyOnce,
                no_local: false,
            },
        ];
        let mut r = Remote::new(&o);
        r.got();
        r.connack(false, None);
        let got = r.got();
        let [Got::Subscribe { pkid, ref filters }] = got[..] else {
            panic!("{got:?}")
        };
        assert_eq!(
            filters,
            &vec![
                ("down/#".to_string(), 1, v5),
                ("secret/#".to_string(), 2, false)
            ]
        );
        let mut b = BytesMut::new();
        if v5 {
            v5::SubAck::new(
                pkid,
                vec![
                    v5::SubscribeReasonCode::QoS1,
                    v5::SubscribeReasonCode::NotAuthorized,
                ],
            )
            .write(&mut b)
            .unwrap();
        } else {
            v4::SubAck::new(
                pkid,
                vec![
                    v4::SubscribeReasonCode::Success(mqttbytes::QoS::AtLeastOnce),
                    v4::SubscribeReasonCode::Failure,
                ],
            )
            .write(&mut b)
            .unwrap();
        }
        r.feed(b, T0);
        let ev = r.events();
        let want = if v5 { 0x87 } else { 0x80 };
        assert!(
            matches!(&ev[..], [Event::Connected { .. }, Event::SubscribeRefused { filter, reason }] if filter == "secret/#" && *reason == want),
            "{ev:?}"
        );
        assert!(r.core.is_connected(), "a refused filter is not fatal");
    });
}

#[test]
fn incoming_qos1_acked_only_when_the_owner_says() {
    both(|v5| {
        let mut r = Remote::connected(&opts(v5));
        r.send_publish("down/a", 1, 5, false);
        let ev = r.events();
        let [Event::Message(m)] = &ev[..] else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (m.packet_id, m.topic.as_str(), &m.payload[..]),
            (5, "down/a", &b"down"[..])
        );
        assert!(r.got().is_empty(), "no PUBACK before the owner stored it");
        assert!(r.core.ack_incoming(5, r.at(T0)));
        assert_eq!(r.got(), vec![Got::PubAck(5)]);
        assert!(!r.core.ack_incoming(5, r.at(T0)), "acknowledged once");
        assert!(r.got().is_empty());
    });
}

#[test]
fn incoming_qos2_duplicate_is_not_delivered_again() {
    both(|v5| {
        let mut r = Remote::connected(&opts(v5));
        r.send_publish("down/b", 2, 9, false);
        assert_eq!(r.events().len(), 1);
        // A re-send before the owner acknowledged: still with the owner, not delivered again.
        r.send_publish("down/b", 2, 9, true);
        assert!(r.events().is_empty());
        assert!(r.got().is_empty());
        assert!(r.core.ack_incoming(9, r.at(T0)));
        assert_eq!(r.got(), vec![Got::PubRec(9)]);
        // A re-send after PUBREC: PUBREC again, nothing delivered.
        r.send_publish("down/b", 2, 9, true);
        assert!(r.events().is_empty());
        assert_eq!(r.got(), vec![Got::PubRec(9)]);
        r.ack(6, 9, 0);
        assert_eq!(r.got(), vec![Got::PubComp(9)]);
        // The id is free again: a new message with it is delivered.
        r.send_publish("down/b", 2, 9, false);
        assert_eq!(r.events().len(), 1);
    });
}

#[test]
fn v5_inbound_window_is_enforced() {
    let mut o = opts(true);
    o.inbound_window = 2;
    let mut r = Remote::connected(&o);
    r.send_publish("d", 1, 1, false);
    r.send_publish("d", 1, 2, false);
    r.send_publish("d", 1, 3, false);
    let ev = r.events();
    assert!(
        matches!(
            &ev[..],
            [
                Event::Message(_),
                Event::Message(_),
                Event::Closed(CloseReason::Protocol(ProtocolError::ReceiveMaximumExceeded))
            ]
        ),
        "{ev:?}"
    );
    assert_eq!(r.got(), vec![Got::Disconnect(0x93)]);
}

#[test]
fn keep_alive_ping_and_timeout() {
    both(|v5| {
        let mut r = Remote::connected(&opts(v5));
        let ka = Duration::from_secs(10);
        assert_eq!(r.core.next_timer(), Some(r.at(ka)));
        r.core.handle_timer(r.at(Duration::from_secs(9)));
        assert!(r.got().is_empty());
        r.core.handle_timer(r.at(ka));
        assert_eq!(r.got(), vec![Got::PingReq]);
        // PINGRESP within the keep-alive: alive, next ping a keep-alive later.
        let mut b = BytesMut::new();
        v4::PingResp.write(&mut b).unwrap();
        r.feed(b, Duration::from_secs(12));
        assert!(r.events().is_empty());
        assert_eq!(r.core.next_timer(), Some(r.at(Duration::from_secs(20))));
        r.core.handle_timer(r.at(Duration::from_secs(20)));
        assert_eq!(r.got(), vec![Got::PingReq]);
        // No answer at all: closed a keep-alive after the PINGREQ.
        assert_eq!(r.core.next_timer(), Some(r.at(Duration::from_secs(30))));
        r.core.handle_timer(r.at(Duration::from_secs(29)));
        assert!(r.events().is_empty());
        r.core.handle_timer(r.at(Duration::from_secs(30)));
        assert!(matches!(
            r.events()[..],
            [Event::Closed(CloseReason::KeepAliveTimeout)]
        ));
        let want = if v5 { 0x8d } else { 0 };
        assert_eq!(r.got(), vec![Got::Disconnect(want)]);
        assert_eq!(r.core.next_timer(), None);
    });
}

#[test]
fn v5_server_keep_alive_replaces_ours() {
    let mut r = Remote::new(&opts(true));
    r.got();
    let mut props = v5::ConnAckProperties::new();
    props.server_keep_alive = Some(3);
    r.connack(false, Some(props));
    assert_eq!(r.core.next_timer(), Some(r.at(Duration::from_secs(3))));
}

#[test]
fn server_disconnect_and_owner_disconnect() {
    let mut r = Remote::connected(&opts(true));
    let mut b = BytesMut::new();
    let mut d = v5::Disconnect::new();
    d.reason_code = v5::DisconnectReasonCode::ServerShuttingDown;
    d.write(&mut b).unwrap();
    r.feed(b, T0);
    let ev = r.events();
    let [Event::Closed(reason)] = &ev[..] else {
        panic!("{ev:?}")
    };
    assert_eq!(reason.reason_code(), Some(ReasonCode::ServerShuttingDown));
    both(|v5| {
        let mut r = Remote::connected(&opts(v5));
        r.core.disconnect();
        assert_eq!(r.got(), vec![Got::Disconnect(0)]);
        assert!(matches!(
            r.events()[..],
            [Event::Closed(CloseReason::Shutdown)]
        ));
        assert_eq!(r.core.room(), 0);
    });
}

#[test]
fn input_split_anywhere_decodes_the_same() {
    let mut r = Remote::connected(&opts(true));
    let mut b = BytesMut::new();
    let mut p = v5::Publish::new("down/split", mqttbytes::QoS::AtLeastOnce, vec![7u8; 300]);
    p.pkid = 3;
    p.write(&mut b).unwrap();
    let bytes = b.to_vec();
    let mut buf = BytesMut::new();
    for chunk in bytes.chunks(7) {
        buf.extend_from_slice(chunk);
        r.core.handle_input(&mut buf, r.start);
    }
    let ev = r.events();
    assert!(
        matches!(&ev[..], [Event::Message(m)] if m.payload.len() == 300),
        "{ev:?}"
    );
}

#[test]
fn options_are_validated() {
    let mut o = opts(true);
    assert_eq!(o.validate(), Ok(()));
    o.window = 0;
    assert_eq!(o.validate(), Err(OptionsError::Window(0)));
    o.window = 10;
    o.subscriptions.push(Subscription {
        filter: "a/#/b".into(),
        qos: QoS::AtMostOnce,
        no_local: false,
    });
    assert!(matches!(o.validate(), Err(OptionsError::Filter(_))));
}
