//! What only MQTT 5 has, end to end: CONNACK properties, Clean Start beside Session Expiry,
//! subscription identifiers, request/response properties, No Local, message expiry, Receive
//! Maximum, the client's Maximum Packet Size, topic aliases and the Payload Format Indicator.
//! The scenarios 5.0 shares with 3.1.1 are written once, for both, in pubsub.rs.

use crate::common::v5::{self, Closed, Ev};
use crate::common::{cid, Broker, QUIET, WAIT};
use rumqttc::v5::mqttbytes::v5::{
    Filter, Packet, PubAckReason, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_connack_properties() {
    let b = Broker::default().await;
    let c = v5::connect(b.port(), &cid("v5-props")).await;
    assert_eq!(
        c.connack.code,
        rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
    );
    assert!(!c.connack.session_present);
    let p = c.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(p.receive_max, Some(1024));
    assert_eq!(p.max_qos, None, "Maximum QoS is only sent when < 2");
    assert_eq!(p.retain_available, Some(1));
    assert_eq!(p.max_packet_size, Some(1_048_576));
    assert_eq!(p.topic_alias_max, Some(64));
    assert_eq!(p.wildcard_subscription_available, Some(1));
    assert_eq!(p.subscription_identifiers_available, Some(1));
    assert_eq!(p.shared_subscription_available, Some(1));
    assert_eq!(p.assigned_client_identifier, None);
    c.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_connack_max_qos_and_session_expiry_cap() {
    let b = Broker::start("[mqtt]\nmax_qos = 1\n[limits]\nmax_session_expiry = 30\n").await;
    let id = cid("v5-cap");
    let mut c = v5::connect_with(v5::persistent_opts(&id, b.port(), 3600)).await;
    let p = c.connack.properties.clone().expect("CONNACK properties");
    assert_eq!(p.max_qos, Some(1));
    assert_eq!(
        p.session_expiry_interval,
        Some(30),
        "lowered session expiry must be reported"
    );
    assert_eq!(
        c.subscribe("cap/t", QoS::ExactlyOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    c.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_clean_start_discards_session_even_with_session_expiry() {
    let b = Broker::default().await;
    let id = cid("v5-cs");
    let mut c = v5::connect_with(v5::persistent_opts(&id, b.port(), 60)).await;
    c.subscribe("cs/t", QoS::AtLeastOnce).await;
    c.disconnect().await;

    // Clean Start discards the session [MQTT-3.1.2-4] and then Session Present is 0, even
    // though this connection asks for a session that outlives it.
    let mut o = v5::persistent_opts(&id, b.port(), 60);
    o.set_clean_start(true);
    let c = v5::connect_with(o).await;
    assert!(!c.connack.session_present);
    c.disconnect().await;
    // The old subscription went with it.
    let mut publ = v5::connect(b.port(), &cid("v5-cs-pub")).await;
    publ.client
        .publish("cs/t", QoS::AtLeastOnce, false, b"x".to_vec())
        .await
        .unwrap();
    match publ
        .next_where(WAIT, |e| {
            matches!(e, Ev::Pkt(Packet::PubAck(_)) | Ev::Closed(_))
        })
        .await
    {
        Some(Ev::Pkt(Packet::PubAck(a))) => {
            assert_eq!(a.reason, PubAckReason::NoMatchingSubscribers)
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
    publ.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_expiry_zero_ends_session_at_disconnect() {
    let b = Broker::default().await;
    let id = cid("v5-se0");
    let mut publ = v5::connect(b.port(), &cid("v5-se0-pub")).await;
    let mut c = v5::connect_with(v5::persistent_opts(&id, b.port(), 0)).await;
    c.subscribe("se0/t", QoS::AtLeastOnce).await;
    c.disconnect().await;
    publ.publish("se0/t", QoS::AtLeastOnce, false, b"lost")
        .await;

    let mut c = v5::connect_with(v5::persistent_opts(&id, b.port(), 60)).await;
    assert!(!c.connack.session_present);
    c.expect_no_publish(QUIET).await;
    c.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_overlapping_subscriptions_carry_all_identifiers() {
    let b = Broker::default().await;
    let mut sub = v5::connect(b.port(), &cid("v5-ov-sub")).await;
    let mut publ = v5::connect(b.port(), &cid("v5-ov-pub")).await;
    sub.subscribe_id("ov/+", QoS::AtMostOnce, 1).await;
    sub.subscribe_id("ov/#", QoS::ExactlyOnce, 2).await;

    publ.publish("ov/x", QoS::ExactlyOnce, false, b"both").await;
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"both");
    assert_eq!(
        p.qos,
        QoS::ExactlyOnce,
        "one copy at the highest granted QoS"
    );
    let mut ids = p
        .properties
        .map(|p| p.subscription_identifiers)
        .unwrap_or_default();
    ids.sort();
    assert_eq!(ids, vec![1, 2]);
    sub.expect_no_publish(QUIET).await;

    publ.publish("ov/x/y", QoS::AtLeastOnce, false, b"one")
        .await;
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"one");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    let ids = p
        .properties
        .map(|p| p.subscription_identifiers)
        .unwrap_or_default();
    assert_eq!(ids, vec![2]);
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_request_response_properties_pass_through() {
    let b = Broker::default().await;
    let req_id = cid("v5-rr-req");
    let mut o = v5::opts(&req_id, b.port());
    o.set_request_response_info(Some(1));
    let mut requester = v5::connect_with(o).await;
    let info = requester
        .connack
        .properties
        .as_ref()
        .and_then(|p| p.response_information.clone());
    assert_eq!(info, Some(format!("reply/{req_id}")));
    let mut responder = v5::connect(b.port(), &cid("v5-rr-resp")).await;
    responder.subscribe("svc/req", QoS::AtLeastOnce).await;
    let reply_topic = format!("reply/{req_id}/1");
    requester.subscribe(&reply_topic, QoS::AtLeastOnce).await;

    let user = vec![
        ("k".to_string(), "1".to_string()),
        ("a".to_string(), "2".to_string()),
        ("k".to_string(), "3".to_string()),
    ];
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some(reply_topic.clone()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00corr\xff")),
        user_properties: user.clone(),
        ..Default::default()
    };
    requester
        .publish_props("svc/req", QoS::AtLeastOnce, false, br#"{"q":1}"#, props)
        .await;

    let req = responder.recv_publish().await;
    assert_eq!(&req.payload[..], br#"{"q":1}"#);
    let rp = req.properties.clone().expect("properties forwarded");
    assert_eq!(rp.payload_format_indicator, Some(1));
    assert_eq!(rp.content_type.as_deref(), Some("application/json"));
    assert_eq!(rp.response_topic.as_deref(), Some(reply_topic.as_str()));
    assert_eq!(rp.correlation_data.as_deref(), Some(&b"\x00corr\xff"[..]));
    assert_eq!(rp.user_properties, user, "user properties in order");

    let reply = PublishProperties {
        correlation_data: rp.correlation_data.clone(),
        ..Default::default()
    };
    responder
        .publish_props(&reply_topic, QoS::AtLeastOnce, false, b"answer", reply)
        .await;
    let ans = requester.recv_publish().await;
    assert_eq!(&ans.payload[..], b"answer");
    assert_eq!(
        ans.properties.and_then(|p| p.correlation_data).as_deref(),
        Some(&b"\x00corr\xff"[..])
    );
    requester.disconnect().await;
    responder.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_no_local() {
    let b = Broker::default().await;
    let mut nl = v5::connect(b.port(), &cid("v5-nl")).await;
    let mut echo = v5::connect(b.port(), &cid("v5-nl-echo")).await;
    let mut other = v5::connect(b.port(), &cid("v5-nl-other")).await;
    let mut f = Filter::new("nl/t", QoS::AtLeastOnce);
    f.nolocal = true;
    nl.subscribe_filter(f, None).await;
    echo.subscribe("nl/t", QoS::AtLeastOnce).await;
    other.subscribe("nl/t", QoS::AtLeastOnce).await;

    nl.publish("nl/t", QoS::AtLeastOnce, false, b"from-nl")
        .await;
    assert_eq!(&other.recv_publish().await.payload[..], b"from-nl");
    assert_eq!(&echo.recv_publish().await.payload[..], b"from-nl");
    nl.expect_no_publish(QUIET).await;

    // Without No Local a client gets its own messages.
    echo.publish("nl/t", QoS::AtLeastOnce, false, b"from-echo")
        .await;
    assert_eq!(&echo.recv_publish().await.payload[..], b"from-echo");
    assert_eq!(&nl.recv_publish().await.payload[..], b"from-echo");
    assert_eq!(&other.recv_publish().await.payload[..], b"from-echo");
    for c in [nl, echo, other] {
        c.disconnect().await;
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_message_expiry_while_offline() {
    let b = Broker::default().await;
    let id = cid("v5-exp");
    let mut s = v5::connect_with(v5::persistent_opts(&id, b.port(), 60)).await;
    s.subscribe("exp/t", QoS::AtLeastOnce).await;
    s.disconnect().await;

    let mut publ = v5::connect(b.port(), &cid("v5-exp-pub")).await;
    let expiring = |secs| PublishProperties {
        message_expiry_interval: Some(secs),
        ..Default::default()
    };
    publ.publish_props("exp/t", QoS::AtLeastOnce, false, b"short", expiring(1))
        .await;
    publ.publish_props("exp/t", QoS::AtLeastOnce, false, b"long", expiring(100))
        .await;
    publ.publish("exp/t", QoS::AtLeastOnce, false, b"forever")
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let mut s = v5::connect_with(v5::persistent_opts(&id, b.port(), 60)).await;
    assert!(s.connack.session_present);
    let p = s.recv_publish().await;
    assert_eq!(&p.payload[..], b"long", "expired message was delivered");
    let left = p
        .properties
        .as_ref()
        .and_then(|p| p.message_expiry_interval)
        .expect("remaining Message Expiry Interval forwarded");
    assert!(
        (90..100).contains(&left),
        "forwarded expiry should be the remaining time (about 97 s), got {left}"
    );
    let p = s.recv_publish().await;
    assert_eq!(&p.payload[..], b"forever");
    assert_eq!(p.properties.and_then(|p| p.message_expiry_interval), None);
    s.expect_no_publish(QUIET).await;
    s.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_receive_maximum_bounds_outbound_inflight() {
    let b = Broker::default().await;
    let mut o = v5::opts(&cid("v5-rm-sub"), b.port());
    o.set_receive_maximum(Some(2));
    o.set_manual_acks(true);
    let mut sub = v5::connect_with(o).await;
    sub.subscribe("rm/t", QoS::AtLeastOnce).await;
    let mut publ = v5::connect(b.port(), &cid("v5-rm-pub")).await;
    for i in 0..5u8 {
        publ.publish("rm/t", QoS::AtLeastOnce, false, &[i]).await;
    }
    // The window is 2: after each ack exactly one more message is released.
    let m0 = sub.recv_publish().await;
    let m1 = sub.recv_publish().await;
    assert_eq!((m0.payload[0], m1.payload[0]), (0, 1));
    sub.expect_no_publish(QUIET).await;
    sub.client.ack(&m0).await.unwrap();
    let m2 = sub.recv_publish().await;
    assert_eq!(m2.payload[0], 2);
    sub.expect_no_publish(Duration::from_millis(200)).await;
    sub.client.ack(&m1).await.unwrap();
    let m3 = sub.recv_publish().await;
    assert_eq!(m3.payload[0], 3);
    sub.expect_no_publish(Duration::from_millis(200)).await;
    sub.client.ack(&m2).await.unwrap();
    sub.client.ack(&m3).await.unwrap();
    let m4 = sub.recv_publish().await;
    assert_eq!(m4.payload[0], 4);
    sub.client.ack(&m4).await.unwrap();
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_client_maximum_packet_size_skips_large_messages() {
    let b = Broker::default().await;
    let mut o = v5::opts(&cid("v5-mps-small"), b.port());
    o.set_max_packet_size(Some(256));
    let mut small = v5::connect_with(o).await;
    small.subscribe("mps/t", QoS::AtLeastOnce).await;
    let mut big = v5::connect(b.port(), &cid("v5-mps-big")).await;
    big.subscribe("mps/t", QoS::AtLeastOnce).await;
    let mut publ = v5::connect(b.port(), &cid("v5-mps-pub")).await;
    publ.publish("mps/t", QoS::AtLeastOnce, false, &[b'x'; 1000])
        .await;
    publ.publish("mps/t", QoS::AtLeastOnce, false, b"small")
        .await;
    assert_eq!(big.recv_publish().await.payload.len(), 1000);
    assert_eq!(&big.recv_publish().await.payload[..], b"small");
    let m = small.recv_publish().await;
    assert_eq!(
        &m.payload[..],
        b"small",
        "oversized message must be skipped"
    );
    small.expect_no_publish(QUIET).await;
    for c in [small, big, publ] {
        c.disconnect().await;
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_outbound_topic_aliases() {
    let b = Broker::default().await;
    let mut o = v5::opts(&cid("v5-ta-sub"), b.port());
    o.set_topic_alias_max(Some(4));
    let mut sub = v5::connect_with(o).await;
    sub.subscribe("ta/#", QoS::AtLeastOnce).await;
    let mut publ = v5::connect(b.port(), &cid("v5-ta-pub")).await;
    let topics = ["ta/one", "ta/two", "ta/one", "ta/two", "ta/one"];
    for (i, t) in topics.iter().enumerate() {
        publ.publish(t, QoS::AtLeastOnce, false, &[i as u8]).await;
    }
    let mut aliased = 0;
    for (i, t) in topics.iter().enumerate() {
        let m = sub.recv_publish().await;
        // rumqttc resolves an empty topic through the alias table.
        assert_eq!(&m.topic[..], t.as_bytes());
        assert_eq!(m.payload[0], i as u8);
        if let Some(a) = m.properties.as_ref().and_then(|p| p.topic_alias) {
            assert!(
                (1..=4).contains(&a),
                "alias {a} above the advertised maximum"
            );
            aliased += 1;
        }
    }
    assert!(aliased > 0, "broker assigned no topic aliases");
    // A client without Topic Alias Maximum never gets aliases.
    let mut plain = v5::connect(b.port(), &cid("v5-ta-plain")).await;
    plain.subscribe("ta/#", QoS::AtLeastOnce).await;
    publ.publish("ta/one", QoS::AtLeastOnce, false, b"p").await;
    let m = plain.recv_publish().await;
    assert_eq!(&m.topic[..], b"ta/one");
    assert_eq!(m.properties.and_then(|p| p.topic_alias), None);
    for c in [sub, publ, plain] {
        c.disconnect().await;
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_invalid_utf8_with_payload_format_indicator() {
    let b = Broker::default().await;
    let mut sub = v5::connect(b.port(), &cid("v5-pfi-sub")).await;
    sub.subscribe("pfi/t", QoS::AtLeastOnce).await;
    let mut publ = v5::connect(b.port(), &cid("v5-pfi-pub")).await;
    let utf8 = PublishProperties {
        payload_format_indicator: Some(1),
        ..Default::default()
    };
    publ.client
        .publish_with_properties("pfi/t", QoS::AtLeastOnce, false, vec![0xff, 0xfe], utf8)
        .await
        .unwrap();
    match publ.wait_closed(WAIT).await {
        Some(Closed::PubAckFail(PubAckReason::PayloadFormatInvalid)) => {}
        other => panic!("expected PUBACK 0x99, got {other:?}"),
    }
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    b.stop().await;
}
