//! MQTT 5 end to end: CONNACK properties, QoS 0/1/2, downgrade, reason codes, wildcards,
//! subscription identifiers, request/response properties, No Local, message expiry, fan-out
//! and a long ordered QoS 1 stream.

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
async fn v5_empty_client_id_is_assigned() {
    let b = Broker::default().await;
    let mut c = v5::connect(b.port(), "").await;
    let assigned = c
        .connack
        .properties
        .as_ref()
        .and_then(|p| p.assigned_client_identifier.clone())
        .expect("Assigned Client Identifier [MQTT-3.2.2-16]");
    assert!(!assigned.is_empty());
    c.subscribe("assigned/t", QoS::AtLeastOnce).await;
    c.publish("assigned/t", QoS::AtLeastOnce, false, b"hi")
        .await;
    assert_eq!(&c.recv_publish().await.payload[..], b"hi");
    c.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_connack_session_present() {
    let b = Broker::default().await;
    let id = cid("v5-sp");
    let mut c = v5::connect_with(v5::persistent_opts(&id, b.port(), 60)).await;
    assert!(!c.connack.session_present);
    c.subscribe("sp/t", QoS::AtLeastOnce).await;
    c.disconnect().await;

    let c = v5::connect_with(v5::persistent_opts(&id, b.port(), 60)).await;
    assert!(c.connack.session_present, "session was not resumed");
    c.disconnect().await;

    // Clean Start discards the session [MQTT-3.1.2-4] and then Session Present is 0.
    let mut o = v5::persistent_opts(&id, b.port(), 60);
    o.set_clean_start(true);
    let c = v5::connect_with(o).await;
    assert!(!c.connack.session_present);
    c.disconnect().await;
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
async fn v5_publish_subscribe_qos_0_1_2() {
    let b = Broker::default().await;
    let mut sub = v5::connect(b.port(), &cid("v5-q-sub")).await;
    let mut publ = v5::connect(b.port(), &cid("v5-q-pub")).await;
    assert_eq!(
        sub.subscribe("q/t", QoS::ExactlyOnce).await,
        vec![SubscribeReasonCode::Success(QoS::ExactlyOnce)]
    );
    for (qos, payload) in [
        (QoS::AtMostOnce, "m0"),
        (QoS::AtLeastOnce, "m1"),
        (QoS::ExactlyOnce, "m2"),
    ] {
        publ.publish("q/t", qos, false, payload.as_bytes()).await;
        let p = sub.recv_publish().await;
        assert_eq!(&p.topic[..], b"q/t");
        assert_eq!(&p.payload[..], payload.as_bytes());
        assert_eq!(p.qos, qos, "delivered QoS for {payload}");
        assert!(!p.retain);
    }
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_qos_downgraded_to_granted() {
    let b = Broker::default().await;
    let mut sub = v5::connect(b.port(), &cid("v5-dg-sub")).await;
    let mut publ = v5::connect(b.port(), &cid("v5-dg-pub")).await;
    sub.subscribe("dg/0", QoS::AtMostOnce).await;
    sub.subscribe("dg/1", QoS::AtLeastOnce).await;
    sub.subscribe("dg/2", QoS::ExactlyOnce).await;
    for (topic, pub_qos, want) in [
        ("dg/0", QoS::ExactlyOnce, QoS::AtMostOnce),
        ("dg/1", QoS::ExactlyOnce, QoS::AtLeastOnce),
        ("dg/0", QoS::AtLeastOnce, QoS::AtMostOnce),
        ("dg/2", QoS::AtLeastOnce, QoS::AtLeastOnce),
    ] {
        publ.publish(topic, pub_qos, false, b"x").await;
        let p = sub.recv_publish().await;
        assert_eq!(&p.topic[..], topic.as_bytes());
        assert_eq!(p.qos, want, "{topic} published at {pub_qos:?}");
    }
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

async fn puback_reason(c: &mut v5::Client, topic: &str) -> PubAckReason {
    c.client
        .publish(topic, QoS::AtLeastOnce, false, b"x".to_vec())
        .await
        .unwrap();
    match c
        .next_where(WAIT, |e| {
            matches!(e, Ev::Pkt(Packet::PubAck(_)) | Ev::Closed(_))
        })
        .await
    {
        Some(Ev::Pkt(Packet::PubAck(a))) => a.reason,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_puback_no_matching_subscribers() {
    let b = Broker::default().await;
    let mut sub = v5::connect(b.port(), &cid("v5-nms-sub")).await;
    let mut publ = v5::connect(b.port(), &cid("v5-nms-pub")).await;
    assert_eq!(
        puback_reason(&mut publ, "nms/nobody").await,
        PubAckReason::NoMatchingSubscribers
    );
    sub.subscribe("nms/t", QoS::AtLeastOnce).await;
    assert_eq!(
        puback_reason(&mut publ, "nms/t").await,
        PubAckReason::Success
    );
    sub.recv_publish().await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_wildcards_and_dollar_topics() {
    // No $SYS publications: this test checks that clients cannot put anything under '$'.
    let b = Broker::start("[sys_topics]\ninterval = 0").await;
    let mut plus = v5::connect(b.port(), &cid("v5-wc-plus")).await;
    let mut hash = v5::connect(b.port(), &cid("v5-wc-hash")).await;
    let mut all = v5::connect(b.port(), &cid("v5-wc-all")).await;
    let mut sys = v5::connect(b.port(), &cid("v5-wc-sys")).await;
    let mut publ = v5::connect(b.port(), &cid("v5-wc-pub")).await;
    plus.subscribe("+/tennis/#", QoS::AtLeastOnce).await;
    hash.subscribe("a/#", QoS::AtLeastOnce).await;
    all.subscribe("#", QoS::AtLeastOnce).await;
    sys.subscribe("$SYS/#", QoS::AtLeastOnce).await;

    for t in [
        "sport/tennis",
        "sport/tennis/p1",
        "sport/golf",
        "a",
        "a/b",
        "ab",
    ] {
        publ.publish(t, QoS::AtLeastOnce, false, b"x").await;
    }
    publ.publish("z/end", QoS::AtLeastOnce, false, b"x").await;
    let mut got = Vec::new();
    for _ in 0..7 {
        got.push(String::from_utf8(all.recv_publish().await.topic.to_vec()).unwrap());
    }
    assert_eq!(
        got,
        vec![
            "sport/tennis",
            "sport/tennis/p1",
            "sport/golf",
            "a",
            "a/b",
            "ab",
            "z/end"
        ]
    );
    assert_eq!(&plus.recv_publish().await.topic[..], b"sport/tennis");
    assert_eq!(&plus.recv_publish().await.topic[..], b"sport/tennis/p1");
    assert_eq!(&hash.recv_publish().await.topic[..], b"a");
    assert_eq!(&hash.recv_publish().await.topic[..], b"a/b");

    // A client may not publish to a '$' topic: PUBACK 0x87 and nothing is delivered (rumqttc
    // treats the failure reason as fatal for the connection).
    publ.client
        .publish("$SYS/x", QoS::AtLeastOnce, false, b"x".to_vec())
        .await
        .unwrap();
    match publ.wait_closed(WAIT).await {
        Some(Closed::PubAckFail(PubAckReason::NotAuthorized)) => {}
        other => panic!("expected PUBACK 0x87 for $SYS publish, got {other:?}"),
    }
    for c in [&mut plus, &mut hash, &mut all, &mut sys] {
        c.expect_no_publish(QUIET).await;
    }
    for c in [plus, hash, all, sys] {
        c.disconnect().await;
    }
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
async fn v5_fan_out_to_20_subscribers() {
    let b = Broker::default().await;
    let mut subs = Vec::new();
    for i in 0..20 {
        let mut c = v5::connect(b.port(), &cid(&format!("v5-fan-{i}"))).await;
        c.subscribe("fan/t", QoS::ExactlyOnce).await;
        subs.push(c);
    }
    let mut publ = v5::connect(b.port(), &cid("v5-fan-pub")).await;
    publ.publish("fan/t", QoS::ExactlyOnce, false, b"all").await;
    for s in subs.iter_mut() {
        let p = s.recv_publish().await;
        assert_eq!(&p.payload[..], b"all");
        assert_eq!(p.qos, QoS::ExactlyOnce);
    }
    for s in subs.iter_mut() {
        s.expect_no_publish(Duration::from_millis(50)).await;
    }
    for s in subs {
        s.disconnect().await;
    }
    publ.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_thousand_qos1_messages_in_order() {
    let b = Broker::default().await;
    let mut sub = v5::connect(b.port(), &cid("v5-bulk-sub")).await;
    let publ = v5::connect(b.port(), &cid("v5-bulk-pub")).await;
    sub.subscribe("bulk/t", QoS::AtLeastOnce).await;
    let sender = publ.client.clone();
    let producer = tokio::spawn(async move {
        for i in 0..1000u32 {
            sender
                .publish("bulk/t", QoS::AtLeastOnce, false, i.to_be_bytes().to_vec())
                .await
                .expect("queue PUBLISH");
        }
    });
    tokio::time::timeout(Duration::from_secs(20), async {
        for i in 0..1000u32 {
            let p = sub.recv_publish().await;
            assert_eq!(p.qos, QoS::AtLeastOnce);
            assert_eq!(
                u32::from_be_bytes(p.payload[..].try_into().expect("4-byte payload")),
                i,
                "message out of order"
            );
        }
    })
    .await
    .expect("1000 messages delivered within 20 s");
    tokio::time::timeout(WAIT, producer)
        .await
        .expect("producer finished")
        .unwrap();
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_unsubscribe_stops_delivery() {
    let b = Broker::default().await;
    let mut sub = v5::connect(b.port(), &cid("v5-un-sub")).await;
    let mut publ = v5::connect(b.port(), &cid("v5-un-pub")).await;
    sub.subscribe("un/t", QoS::AtLeastOnce).await;
    publ.publish("un/t", QoS::AtLeastOnce, false, b"1").await;
    assert_eq!(&sub.recv_publish().await.payload[..], b"1");
    sub.client.unsubscribe("un/t").await.unwrap();
    match sub
        .next_where(WAIT, |e| {
            matches!(e, Ev::Pkt(Packet::UnsubAck(_)) | Ev::Closed(_))
        })
        .await
    {
        Some(Ev::Pkt(Packet::UnsubAck(u))) => assert_eq!(
            u.reasons,
            vec![rumqttc::v5::mqttbytes::v5::UnsubAckReason::Success]
        ),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    publ.publish("un/t", QoS::AtLeastOnce, false, b"2").await;
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_rejected_subscriptions() {
    let b = Broker::default().await;
    // A shared subscription without a ShareName: 0x8F ([MQTT-4.8.2-1]).
    let mut shared = v5::connect(b.port(), &cid("v5-rej-shared")).await;
    shared
        .client
        .subscribe("$share//rej/t", QoS::AtLeastOnce)
        .await
        .unwrap();
    match shared.wait_closed(WAIT).await {
        Some(Closed::SubFail(SubscribeReasonCode::TopicFilterInvalid)) => {}
        other => panic!("expected SUBACK 0x8F, got {other:?}"),
    }
    // Another client's response prefix: 0x87.
    let mut nosy = v5::connect(b.port(), &cid("v5-rej-nosy")).await;
    nosy.client
        .subscribe("reply/someone-else/x", QoS::AtLeastOnce)
        .await
        .unwrap();
    match nosy.wait_closed(WAIT).await {
        Some(Closed::SubFail(SubscribeReasonCode::NotAuthorized)) => {}
        other => panic!("expected SUBACK 0x87, got {other:?}"),
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_anonymous_rejected_when_not_allowed() {
    let b = Broker::start_raw(
        "[listeners.tcp]\nbind = \"127.0.0.1:0\"\n[metrics]\nbind = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = false\n",
    )
    .await;
    match v5::try_connect_with(v5::opts(&cid("v5-anon"), b.port())).await {
        Err(Closed::Refused(rumqttc::v5::mqttbytes::v5::ConnectReturnCode::NotAuthorized)) => {}
        Err(other) => panic!("expected CONNACK 0x87, got {other:?}"),
        Ok(_) => panic!("anonymous client accepted"),
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_shutdown_sends_server_shutting_down() {
    use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
    let b = Broker::default().await;
    let mut c = v5::connect(b.port(), &cid("v5-shut")).await;
    b.stop().await;
    match c.wait_closed(WAIT).await {
        Some(Closed::ServerDisconnect(DisconnectReasonCode::ServerShuttingDown)) => {}
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
}
