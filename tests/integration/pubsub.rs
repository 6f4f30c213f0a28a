//! Connect, publish and subscribe end to end, each scenario written once and run with a 3.1.1
//! and a 5.0 client (`both_versions!`): Session Present, empty client ids, QoS 0/1/2, downgrade
//! to the granted QoS, `max_qos`, wildcards and '$' topics, overlapping subscriptions,
//! unsubscribe, rejected subscriptions, refused anonymous clients, fan-out and a long ordered
//! QoS 1 stream. Where the versions differ only in a code, the expectation is
//! `v.pick(3.1.1 value, 5.0 value)`. What only 5.0 has is in v5.rs.

use crate::common::any::{Client, Closed, Version};
use crate::common::{Broker, QUIET, WAIT};
use std::time::Duration;

both_versions!(
    connack_session_present,
    empty_client_id_with_clean_session_is_accepted,
    publish_subscribe_qos_0_1_2,
    qos_downgraded_to_granted,
    suback_capped_by_max_qos,
    puback_when_nobody_subscribed,
    wildcards_and_dollar_topics,
    overlapping_subscriptions_one_copy_at_highest_qos,
    unsubscribe_stops_delivery,
    rejected_subscriptions,
    anonymous_rejected_when_not_allowed,
    fan_out_to_20_subscribers,
    thousand_qos1_messages_in_order,
);

async fn connack_session_present(v: Version) {
    let b = Broker::default().await;
    let id = v.cid("sp");

    // A clean session never has a session present [MQTT-3.2.2-1].
    let c = v.connect(b.port(), &v.cid("sp-clean")).await;
    assert!(!c.session_present());
    c.disconnect().await;

    // First persistent connect: nothing stored yet [MQTT-3.2.2-3].
    let mut c = v.opts(&id, b.port()).persistent().connect().await;
    assert!(!c.session_present());
    c.subscribe("sp/t", 1).await;
    c.disconnect().await;

    // Resumed [MQTT-3.2.2-2].
    let c = v.opts(&id, b.port()).persistent().connect().await;
    assert!(c.session_present(), "persistent session was not resumed");
    c.disconnect().await;

    // A clean session (3.1.1 CleanSession=1, 5.0 Clean Start=1) discards it [MQTT-3.1.2-6]
    // [MQTT-3.1.2-4] ...
    let c = v.connect(b.port(), &id).await;
    assert!(!c.session_present());
    c.disconnect().await;

    // ... so the next persistent connect starts afresh.
    let c = v.opts(&id, b.port()).persistent().connect().await;
    assert!(
        !c.session_present(),
        "session survived a clean-session connect"
    );
    c.disconnect().await;
    b.stop().await;
}

async fn empty_client_id_with_clean_session_is_accepted(v: Version) {
    let b = Broker::default().await;
    let mut c = v.connect(b.port(), "").await;
    // 5.0 tells the client the identifier it got [MQTT-3.2.2-16]; 3.1.1 has no way to.
    match v {
        Version::V311 => assert_eq!(c.assigned_client_id(), None),
        Version::V5 => assert!(
            !c.assigned_client_id()
                .expect("Assigned Client Identifier")
                .is_empty(),
            "empty Assigned Client Identifier"
        ),
    }
    c.subscribe("anon/t", 1).await;
    c.publish("anon/t", 1, false, b"hi").await;
    assert_eq!(&c.recv_publish().await.payload[..], b"hi");
    c.disconnect().await;
    b.stop().await;
}

async fn publish_subscribe_qos_0_1_2(v: Version) {
    let b = Broker::default().await;
    let mut sub = v.connect(b.port(), &v.cid("q-sub")).await;
    let mut publ = v.connect(b.port(), &v.cid("q-pub")).await;
    assert_eq!(sub.subscribe("q/t", 2).await, vec![2]);

    for (qos, payload) in [(0, "m0"), (1, "m1"), (2, "m2")] {
        publ.publish("q/t", qos, false, payload.as_bytes()).await;
        let p = sub.recv_publish().await;
        assert_eq!(p.topic, "q/t");
        assert_eq!(&p.payload[..], payload.as_bytes());
        assert_eq!(p.qos, qos, "delivered QoS for {payload}");
        assert!(!p.retain);
        assert!(!p.dup);
    }
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

async fn qos_downgraded_to_granted(v: Version) {
    let b = Broker::default().await;
    let mut sub = v.connect(b.port(), &v.cid("dg-sub")).await;
    let mut publ = v.connect(b.port(), &v.cid("dg-pub")).await;
    sub.subscribe("dg/0", 0).await;
    sub.subscribe("dg/1", 1).await;
    sub.subscribe("dg/2", 2).await;

    for (topic, pub_qos, want) in [
        ("dg/0", 2, 0),
        ("dg/1", 2, 1),
        ("dg/0", 1, 0),
        ("dg/2", 1, 1),
        ("dg/2", 0, 0),
    ] {
        publ.publish(topic, pub_qos, false, b"x").await;
        let p = sub.recv_publish().await;
        assert_eq!(p.topic, topic);
        assert_eq!(p.qos, want, "{topic} published at QoS {pub_qos}");
    }
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

async fn suback_capped_by_max_qos(v: Version) {
    let b = Broker::start("[mqtt]\nmax_qos = 1\n").await;
    let mut sub = v.connect(b.port(), &v.cid("mq-sub")).await;
    let mut publ = v.connect(b.port(), &v.cid("mq-pub")).await;
    assert_eq!(sub.subscribe("mq/t", 2).await, vec![1]);
    publ.publish("mq/t", 1, false, b"x").await;
    assert_eq!(sub.recv_publish().await.qos, 1);
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

/// PUBACK when nobody subscribed: 5.0 says so (0x10, No matching subscribers), a 3.1.1 PUBACK
/// has no reason code.
async fn puback_when_nobody_subscribed(v: Version) {
    let b = Broker::default().await;
    let mut sub = v.connect(b.port(), &v.cid("nms-sub")).await;
    let mut publ = v.connect(b.port(), &v.cid("nms-pub")).await;
    assert_eq!(
        publ.publish_rc("nms/nobody", b"x").await,
        v.pick(0x00, 0x10)
    );
    sub.subscribe("nms/t", 1).await;
    assert_eq!(publ.publish_rc("nms/t", b"x").await, 0x00);
    sub.recv_publish().await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

async fn collect_topics_until(c: &mut Client, last: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let p = c.recv_publish().await;
        got.push(p.topic.clone());
        if p.topic == last {
            return got;
        }
        assert!(got.len() < 50, "{}: runaway deliveries {got:?}", c.id());
    }
}

async fn wildcards_and_dollar_topics(v: Version) {
    // No $SYS publications: this test checks that clients cannot put anything under '$'.
    let b = Broker::start("[sys_topics]\ninterval = 0").await;
    let mut plus = v.connect(b.port(), &v.cid("wc-plus")).await;
    let mut plus_hash = v.connect(b.port(), &v.cid("wc-plus-hash")).await;
    let mut hash = v.connect(b.port(), &v.cid("wc-hash")).await;
    let mut all = v.connect(b.port(), &v.cid("wc-all")).await;
    let mut sys = v.connect(b.port(), &v.cid("wc-sys")).await;
    let mut publ = v.connect(b.port(), &v.cid("wc-pub")).await;
    plus.subscribe("sport/+/player", 1).await;
    plus_hash.subscribe("+/tennis/#", 1).await;
    hash.subscribe("a/#", 1).await;
    all.subscribe("#", 1).await;
    sys.subscribe("$SYS/#", 1).await;

    let topics = [
        "sport/tennis",
        "sport/tennis/p1",
        "sport/tennis/player",
        "sport/tennis/x/player",
        "sport/player",
        "sport/golf",
        "a",
        "a/b",
        "a/b/c",
        "ab",
    ];
    for t in topics {
        publ.publish(t, 1, false, b"x").await;
    }
    // '$' topics are broker-owned: a client's publish there is never delivered, and '#' would not
    // match it anyway [MQTT-4.7.2-1].
    publ.publish("$SYS/x", 0, false, b"x").await;
    publ.publish("$other", 0, false, b"x").await;
    publ.publish("z/end", 1, false, b"x").await;

    let mut want: Vec<&str> = topics.to_vec();
    want.push("z/end");
    assert_eq!(collect_topics_until(&mut all, "z/end").await, want);
    assert_eq!(plus.recv_publish().await.topic, "sport/tennis/player");
    for t in [
        "sport/tennis",
        "sport/tennis/p1",
        "sport/tennis/player",
        "sport/tennis/x/player",
    ] {
        assert_eq!(plus_hash.recv_publish().await.topic, t);
    }
    for t in ["a", "a/b", "a/b/c"] {
        // "a/#" matches "a" too [MQTT-4.7.1-2].
        assert_eq!(hash.recv_publish().await.topic, t);
    }

    // At QoS 1 the PUBACK says it: 0x87 in 5.0 (rumqttc then ends the connection); 3.1.1 has
    // no way to, the PUBACK is a plain one.
    assert_eq!(publ.publish_rc("$SYS/x", b"x").await, v.pick(0x00, 0x87));
    for c in [&mut plus, &mut plus_hash, &mut hash, &mut all, &mut sys] {
        c.expect_no_publish(QUIET).await;
    }
    for c in [plus, plus_hash, hash, all, sys] {
        c.disconnect().await;
    }
    b.stop().await;
}

async fn overlapping_subscriptions_one_copy_at_highest_qos(v: Version) {
    let b = Broker::default().await;
    let mut sub = v.connect(b.port(), &v.cid("ov-sub")).await;
    let mut publ = v.connect(b.port(), &v.cid("ov-pub")).await;
    sub.subscribe("ov/+", 0).await;
    sub.subscribe("ov/#", 2).await;
    sub.subscribe("ov/x", 1).await;

    publ.publish("ov/x", 2, false, b"one").await;
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"one");
    assert_eq!(p.qos, 2);
    sub.expect_no_publish(QUIET).await;

    // Matches "ov/+" (0) and "ov/#" (2): one copy at min(1, 2).
    publ.publish("ov/y", 1, false, b"two").await;
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"two");
    assert_eq!(p.qos, 1);
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

async fn unsubscribe_stops_delivery(v: Version) {
    let b = Broker::default().await;
    let mut sub = v.connect(b.port(), &v.cid("un-sub")).await;
    let mut publ = v.connect(b.port(), &v.cid("un-pub")).await;
    sub.subscribe("un/t", 1).await;
    publ.publish("un/t", 1, false, b"1").await;
    assert_eq!(&sub.recv_publish().await.payload[..], b"1");
    // A 3.1.1 UNSUBACK carries no reason codes; 5.0 says Success.
    assert_eq!(sub.unsubscribe("un/t").await, v.pick(vec![], vec![0x00]));
    publ.publish("un/t", 1, false, b"2").await;
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

/// Filters the broker refuses: 3.1.1 has one failure code (0x80) and the connection stays
/// usable; 5.0 says why (0x8F invalid filter [MQTT-4.8.2-1], 0x87 another client's response
/// topic prefix, reserved with `mqtt.reserve_response_topics`), and rumqttc then ends the
/// connection, so each filter gets its own client.
async fn rejected_subscriptions(v: Version) {
    let b = Broker::start("[mqtt]\nreserve_response_topics = true\n").await;
    for (filter, want) in [
        ("$share/g+/rej/t", v.pick(0x80, 0x8F)),
        ("$share//rej/t", v.pick(0x80, 0x8F)),
        ("reply/someone-else/x", v.pick(0x80, 0x87)),
    ] {
        let mut c = v.connect(b.port(), &v.cid("rej")).await;
        assert_eq!(
            c.subscribe(filter, 1).await,
            vec![want],
            "SUBACK for {filter}"
        );
        if v == Version::V311 {
            // The connection stays usable.
            assert_eq!(c.subscribe("rej/ok", 1).await, vec![1]);
            c.publish("rej/ok", 1, false, b"ok").await;
            assert_eq!(&c.recv_publish().await.payload[..], b"ok");
            c.disconnect().await;
        }
    }
    b.stop().await;
}

async fn anonymous_rejected_when_not_allowed(v: Version) {
    let b = Broker::start_raw(
        "[listeners.tcp]\nbind = \"127.0.0.1:0\"\n[metrics]\nbind = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = false\n",
    )
    .await;
    match v.opts(&v.cid("anon"), b.port()).try_connect().await {
        // 3.1.1 return code 5 / 5.0 reason code 0x87, both "not authorized".
        Err(Closed::Refused(code)) => assert_eq!(code, v.pick(0x05, 0x87)),
        Err(other) => panic!("expected a refusing CONNACK, got {other:?}"),
        Ok(_) => panic!("anonymous client accepted"),
    }
    b.stop().await;
}

async fn fan_out_to_20_subscribers(v: Version) {
    let b = Broker::default().await;
    let mut subs = Vec::new();
    for i in 0..20 {
        let mut c = v.connect(b.port(), &v.cid(&format!("fan-{i}"))).await;
        c.subscribe("fan/t", 2).await;
        subs.push(c);
    }
    let mut publ = v.connect(b.port(), &v.cid("fan-pub")).await;
    for qos in [1, 2] {
        let payload = format!("all at {qos}");
        publ.publish("fan/t", qos, false, payload.as_bytes()).await;
        for s in subs.iter_mut() {
            let p = s.recv_publish().await;
            assert_eq!(p.payload, payload.as_bytes());
            assert_eq!(p.qos, qos);
        }
        for s in subs.iter_mut() {
            s.expect_no_publish(Duration::from_millis(50)).await;
        }
    }
    for s in subs {
        s.disconnect().await;
    }
    publ.disconnect().await;
    b.stop().await;
}

async fn thousand_qos1_messages_in_order(v: Version) {
    let b = Broker::default().await;
    let mut sub = v.connect(b.port(), &v.cid("bulk-sub")).await;
    let publ = v.connect(b.port(), &v.cid("bulk-pub")).await;
    sub.subscribe("bulk/t", 1).await;

    let sender = publ.sender();
    let producer = tokio::spawn(async move {
        for i in 0..1000u32 {
            sender
                .publish("bulk/t", 1, false, i.to_be_bytes().to_vec())
                .await;
        }
    });
    tokio::time::timeout(Duration::from_secs(20), async {
        for i in 0..1000u32 {
            let p = sub.recv_publish().await;
            assert_eq!(p.qos, 1);
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
