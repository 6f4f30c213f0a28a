//! MQTT 3.1.1 end to end: connect, QoS 0/1/2, downgrade, wildcards, overlapping subscriptions,
//! fan-out and a long ordered QoS 1 stream.

use crate::common::v3::{self, Client};
use crate::common::{cid, Broker, QUIET, WAIT};
use rumqttc::{QoS, SubscribeReasonCode};
use std::time::Duration;

fn persistent(id: &str, port: u16) -> rumqttc::MqttOptions {
    let mut o = v3::opts(id, port);
    o.set_clean_session(false);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_connack_session_present() {
    let b = Broker::default().await;
    let id = cid("v3-sp");

    // A clean session never has a session present [MQTT-3.2.2-1].
    let c = v3::connect(b.port(), &cid("v3-sp-clean")).await;
    assert!(!c.connack.session_present);
    c.disconnect().await;

    // First persistent connect: nothing stored yet [MQTT-3.2.2-3].
    let mut c = v3::connect_with(persistent(&id, b.port())).await;
    assert_eq!(c.connack.code, rumqttc::ConnectReturnCode::Success);
    assert!(!c.connack.session_present);
    c.subscribe("sp/t", QoS::AtLeastOnce).await;
    c.disconnect().await;

    // Resumed [MQTT-3.2.2-2].
    let c = v3::connect_with(persistent(&id, b.port())).await;
    assert!(
        c.connack.session_present,
        "persistent session was not resumed"
    );
    c.disconnect().await;

    // clean session = 1 discards it ...
    let c = v3::connect(b.port(), &id).await;
    assert!(!c.connack.session_present);
    c.disconnect().await;

    // ... so the next persistent connect starts afresh.
    let c = v3::connect_with(persistent(&id, b.port())).await;
    assert!(
        !c.connack.session_present,
        "session survived a clean-session connect"
    );
    c.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_empty_client_id_with_clean_session_is_accepted() {
    let b = Broker::default().await;
    let mut c = v3::connect(b.port(), "").await;
    assert_eq!(c.connack.code, rumqttc::ConnectReturnCode::Success);
    c.subscribe("anon/t", QoS::AtLeastOnce).await;
    c.publish("anon/t", QoS::AtLeastOnce, false, b"hi").await;
    assert_eq!(&c.recv_publish().await.payload[..], b"hi");
    c.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_publish_subscribe_qos_0_1_2() {
    let b = Broker::default().await;
    let mut sub = v3::connect(b.port(), &cid("v3-q-sub")).await;
    let mut publ = v3::connect(b.port(), &cid("v3-q-pub")).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_qos_downgraded_to_granted() {
    let b = Broker::default().await;
    let mut sub = v3::connect(b.port(), &cid("v3-dg-sub")).await;
    let mut publ = v3::connect(b.port(), &cid("v3-dg-pub")).await;
    sub.subscribe("dg/0", QoS::AtMostOnce).await;
    sub.subscribe("dg/1", QoS::AtLeastOnce).await;
    sub.subscribe("dg/2", QoS::ExactlyOnce).await;

    for (topic, pub_qos, want) in [
        ("dg/0", QoS::ExactlyOnce, QoS::AtMostOnce),
        ("dg/1", QoS::ExactlyOnce, QoS::AtLeastOnce),
        ("dg/0", QoS::AtLeastOnce, QoS::AtMostOnce),
        ("dg/2", QoS::AtLeastOnce, QoS::AtLeastOnce),
        ("dg/2", QoS::AtMostOnce, QoS::AtMostOnce),
    ] {
        publ.publish(topic, pub_qos, false, b"x").await;
        let p = sub.recv_publish().await;
        assert_eq!(p.topic, topic);
        assert_eq!(p.qos, want, "{topic} published at {pub_qos:?}");
    }
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_suback_capped_by_max_qos() {
    let b = Broker::start("[mqtt]\nmax_qos = 1\n").await;
    let mut sub = v3::connect(b.port(), &cid("v3-mq-sub")).await;
    let mut publ = v3::connect(b.port(), &cid("v3-mq-pub")).await;
    assert_eq!(
        sub.subscribe("mq/t", QoS::ExactlyOnce).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    publ.publish("mq/t", QoS::AtLeastOnce, false, b"x").await;
    assert_eq!(sub.recv_publish().await.qos, QoS::AtLeastOnce);
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
        assert!(got.len() < 50, "{}: runaway deliveries {got:?}", c.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_wildcards() {
    // No $SYS publications: this test checks that clients cannot put anything under '$'.
    let b = Broker::start("[sys_topics]\ninterval = 0").await;
    let mut plus = v3::connect(b.port(), &cid("v3-wc-plus")).await;
    let mut hash = v3::connect(b.port(), &cid("v3-wc-hash")).await;
    let mut all = v3::connect(b.port(), &cid("v3-wc-all")).await;
    let mut sys = v3::connect(b.port(), &cid("v3-wc-sys")).await;
    let mut publ = v3::connect(b.port(), &cid("v3-wc-pub")).await;
    plus.subscribe("sport/+/player", QoS::AtLeastOnce).await;
    hash.subscribe("a/#", QoS::AtLeastOnce).await;
    all.subscribe("#", QoS::AtLeastOnce).await;
    sys.subscribe("$SYS/#", QoS::AtLeastOnce).await;

    for t in [
        "sport/tennis/player",
        "sport/tennis/x/player",
        "sport/player",
        "a",
        "a/b/c",
        "ab",
    ] {
        publ.publish(t, QoS::AtLeastOnce, false, b"x").await;
    }
    // '$' topics are broker-owned: a client's publish there is never delivered, and '#' would not
    // match it anyway.
    publ.publish("$SYS/x", QoS::AtMostOnce, false, b"x").await;
    publ.publish("$other", QoS::AtMostOnce, false, b"x").await;
    publ.publish("z/end", QoS::AtLeastOnce, false, b"x").await;

    assert_eq!(
        collect_topics_until(&mut all, "z/end").await,
        vec![
            "sport/tennis/player",
            "sport/tennis/x/player",
            "sport/player",
            "a",
            "a/b/c",
            "ab",
            "z/end"
        ]
    );
    assert_eq!(plus.recv_publish().await.topic, "sport/tennis/player");
    plus.expect_no_publish(QUIET).await;
    assert_eq!(
        hash.recv_publish().await.topic,
        "a",
        "\"a/#\" must match \"a\""
    );
    assert_eq!(hash.recv_publish().await.topic, "a/b/c");
    hash.expect_no_publish(QUIET).await;
    sys.expect_no_publish(QUIET).await;
    all.expect_no_publish(QUIET).await;
    for c in [plus, hash, all, sys, publ] {
        c.disconnect().await;
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_overlapping_subscriptions_one_copy_at_highest_qos() {
    let b = Broker::default().await;
    let mut sub = v3::connect(b.port(), &cid("v3-ov-sub")).await;
    let mut publ = v3::connect(b.port(), &cid("v3-ov-pub")).await;
    sub.subscribe("ov/+", QoS::AtMostOnce).await;
    sub.subscribe("ov/#", QoS::ExactlyOnce).await;
    sub.subscribe("ov/x", QoS::AtLeastOnce).await;

    publ.publish("ov/x", QoS::ExactlyOnce, false, b"one").await;
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"one");
    assert_eq!(p.qos, QoS::ExactlyOnce);
    sub.expect_no_publish(QUIET).await;

    // Matches "ov/+" (0) and "ov/#" (2): one copy at min(1, 2).
    publ.publish("ov/y", QoS::AtLeastOnce, false, b"two").await;
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"two");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_unsubscribe_stops_delivery() {
    let b = Broker::default().await;
    let mut sub = v3::connect(b.port(), &cid("v3-un-sub")).await;
    let mut publ = v3::connect(b.port(), &cid("v3-un-pub")).await;
    sub.subscribe("un/t", QoS::AtLeastOnce).await;
    publ.publish("un/t", QoS::AtLeastOnce, false, b"1").await;
    assert_eq!(&sub.recv_publish().await.payload[..], b"1");
    sub.client.unsubscribe("un/t").await.unwrap();
    let unsuback = sub
        .next_where(WAIT, |e| {
            matches!(e, v3::Ev::Pkt(rumqttc::Packet::UnsubAck(_)))
        })
        .await;
    assert!(unsuback.is_some(), "no UNSUBACK");
    publ.publish("un/t", QoS::AtLeastOnce, false, b"2").await;
    sub.expect_no_publish(QUIET).await;
    sub.disconnect().await;
    publ.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_fan_out_to_20_subscribers() {
    let b = Broker::default().await;
    let mut subs = Vec::new();
    for i in 0..20 {
        let mut c = v3::connect(b.port(), &cid(&format!("v3-fan-{i}"))).await;
        c.subscribe("fan/t", QoS::AtLeastOnce).await;
        subs.push(c);
    }
    let mut publ = v3::connect(b.port(), &cid("v3-fan-pub")).await;
    publ.publish("fan/t", QoS::AtLeastOnce, false, b"all").await;
    for s in subs.iter_mut() {
        let p = s.recv_publish().await;
        assert_eq!(&p.payload[..], b"all");
        assert_eq!(p.qos, QoS::AtLeastOnce);
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
async fn v311_thousand_qos1_messages_in_order() {
    let b = Broker::default().await;
    let mut sub = v3::connect(b.port(), &cid("v3-bulk-sub")).await;
    let publ = v3::connect(b.port(), &cid("v3-bulk-pub")).await;
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
async fn v311_rejected_subscriptions_get_0x80() {
    let b = Broker::default().await;
    let mut c = v3::connect(b.port(), &cid("v3-rej")).await;
    assert_eq!(
        c.subscribe("$share/g+/rej/t", QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Failure]
    );
    assert_eq!(
        c.subscribe("reply/someone-else/x", QoS::AtLeastOnce).await,
        vec![SubscribeReasonCode::Failure]
    );
    // The connection stays usable.
    c.subscribe("rej/ok", QoS::AtLeastOnce).await;
    c.publish("rej/ok", QoS::AtLeastOnce, false, b"ok").await;
    assert_eq!(&c.recv_publish().await.payload[..], b"ok");
    c.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_anonymous_rejected_when_not_allowed() {
    let b = Broker::start_raw(
        "[listeners.tcp]\nbind = \"127.0.0.1:0\"\n[metrics]\nbind = \"127.0.0.1:0\"\n[auth]\nallow_anonymous = false\n",
    )
    .await;
    match v3::try_connect_with(v3::opts(&cid("v3-anon"), b.port())).await {
        Err(v3::Closed::Refused(rumqttc::ConnectReturnCode::NotAuthorized)) => {}
        Err(other) => panic!("expected CONNACK 0x05, got {other:?}"),
        Ok(_) => panic!("anonymous client accepted"),
    }
    b.stop().await;
}
