//! Retained messages: store, replace, delete and the RETAIN flag on delivery for 3.1.1 and 5.0
//! (`both_versions!`); 5.0 Retain Handling and Retain As Published.

use crate::common::any::Version;
use crate::common::{cid, v5, Broker, QUIET};

both_versions!(retained_store_replace_delete);

async fn retained_store_replace_delete(v: Version) {
    let b = Broker::default().await;
    let mut p = v.connect(b.port(), &v.cid("ret-pub")).await;
    p.publish("ret/a", 2, true, b"one").await;
    p.publish("ret/a", 2, true, b"two").await;
    p.publish("ret/b", 0, true, b"b").await;
    p.publish("ret/c", 1, false, b"not retained").await;

    // New subscription: the replaced value only, with RETAIN=1 [MQTT-3.3.1-6, -8], at the
    // subscription's QoS.
    let mut s = v.connect(b.port(), &v.cid("ret-sub")).await;
    s.subscribe("ret/a", 1).await;
    let m = s.recv_publish().await;
    assert_eq!(&m.payload[..], b"two");
    assert!(m.retain, "retained message must carry RETAIN=1");
    assert_eq!(m.qos, 1);
    s.expect_no_publish(QUIET).await;

    // At QoS 2 each retained message keeps its own QoS.
    let mut s2 = v.connect(b.port(), &v.cid("ret-sub-2")).await;
    s2.subscribe("ret/+", 2).await;
    let mut got = [s2.recv_publish().await, s2.recv_publish().await];
    got.sort_by(|x, y| x.topic.cmp(&y.topic));
    assert_eq!(
        got.iter()
            .map(|m| (m.topic.as_str(), &m.payload[..], m.qos, m.retain))
            .collect::<Vec<_>>(),
        vec![
            ("ret/a", &b"two"[..], 2, true),
            ("ret/b", &b"b"[..], 0, true)
        ]
    );
    s2.expect_no_publish(QUIET).await;

    // Wildcard subscription at QoS 0 gets both retained topics, downgraded.
    let mut w = v.connect(b.port(), &v.cid("ret-wild")).await;
    w.subscribe("ret/#", 0).await;
    let mut got = [w.recv_publish().await, w.recv_publish().await];
    got.sort_by(|x, y| x.topic.cmp(&y.topic));
    assert_eq!(got[0].topic, "ret/a");
    assert_eq!(&got[0].payload[..], b"two");
    assert_eq!(got[1].topic, "ret/b");
    assert!(got.iter().all(|m| m.retain && m.qos == 0));
    w.expect_no_publish(QUIET).await;

    // Live messages to an established subscription have RETAIN=0 [MQTT-3.3.1-9].
    p.publish("ret/a", 1, true, b"three").await;
    let m = s.recv_publish().await;
    assert_eq!(&m.payload[..], b"three");
    assert!(!m.retain);

    // Empty retained payload deletes it, and is itself delivered normally [MQTT-3.3.1-10].
    p.publish("ret/a", 1, true, b"").await;
    let m = s.recv_publish().await;
    assert!(m.payload.is_empty());
    assert!(!m.retain);

    let mut s3 = v.connect(b.port(), &v.cid("ret-sub-3")).await;
    s3.subscribe("ret/a", 1).await;
    s3.subscribe("ret/c", 1).await;
    s3.expect_no_publish(QUIET).await;

    for c in [p, s, s2, w, s3] {
        c.disconnect().await;
    }
    b.stop().await;
}

fn filter(
    path: &str,
    rule: rumqttc::v5::mqttbytes::v5::RetainForwardRule,
    rap: bool,
) -> rumqttc::v5::mqttbytes::v5::Filter {
    let mut f =
        rumqttc::v5::mqttbytes::v5::Filter::new(path, rumqttc::v5::mqttbytes::QoS::AtLeastOnce);
    f.retain_forward_rule = rule;
    f.preserve_retain = rap;
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_handling() {
    use rumqttc::v5::mqttbytes::v5::RetainForwardRule as R;
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::default().await;
    let mut p = v5::connect(b.port(), &cid("v5-rh-pub")).await;
    p.publish("rh/t", QoS::AtLeastOnce, true, b"kept").await;

    // 2: never sent on subscribe.
    let mut never = v5::connect(b.port(), &cid("v5-rh-2")).await;
    never
        .subscribe_filter(filter("rh/t", R::Never, false), None)
        .await;
    never.expect_no_publish(QUIET).await;

    // 1: only when the subscription is new.
    let mut new_only = v5::connect(b.port(), &cid("v5-rh-1")).await;
    new_only
        .subscribe_filter(filter("rh/t", R::OnNewSubscribe, false), None)
        .await;
    let m = new_only.recv_publish().await;
    assert_eq!(&m.payload[..], b"kept");
    assert!(m.retain);
    new_only
        .subscribe_filter(filter("rh/t", R::OnNewSubscribe, false), None)
        .await;
    new_only.expect_no_publish(QUIET).await;

    // 0: on every subscribe, including a repeated one.
    let mut always = v5::connect(b.port(), &cid("v5-rh-0")).await;
    always
        .subscribe_filter(filter("rh/t", R::OnEverySubscribe, false), None)
        .await;
    assert_eq!(&always.recv_publish().await.payload[..], b"kept");
    always
        .subscribe_filter(filter("rh/t", R::OnEverySubscribe, false), None)
        .await;
    let m = always.recv_publish().await;
    assert_eq!(&m.payload[..], b"kept");
    assert!(m.retain);

    // Live messages still flow to the Retain Handling 2 subscriber.
    p.publish("rh/t", QoS::AtLeastOnce, false, b"live").await;
    assert_eq!(&never.recv_publish().await.payload[..], b"live");
    for c in [p, never, new_only, always] {
        c.disconnect().await;
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_as_published() {
    use rumqttc::v5::mqttbytes::v5::RetainForwardRule as R;
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::default().await;
    let mut rap = v5::connect(b.port(), &cid("v5-rap-1")).await;
    let mut plain = v5::connect(b.port(), &cid("v5-rap-0")).await;
    rap.subscribe_filter(filter("rap/t", R::OnEverySubscribe, true), None)
        .await;
    plain
        .subscribe_filter(filter("rap/t", R::OnEverySubscribe, false), None)
        .await;
    let mut p = v5::connect(b.port(), &cid("v5-rap-pub")).await;
    p.publish("rap/t", QoS::AtLeastOnce, true, b"r").await;
    p.publish("rap/t", QoS::AtLeastOnce, false, b"n").await;

    let m = rap.recv_publish().await;
    assert_eq!(&m.payload[..], b"r");
    assert!(m.retain, "Retain As Published keeps RETAIN=1");
    let m = rap.recv_publish().await;
    assert_eq!(&m.payload[..], b"n");
    assert!(!m.retain);
    let m = plain.recv_publish().await;
    assert_eq!(&m.payload[..], b"r");
    assert!(
        !m.retain,
        "without Retain As Published live messages have RETAIN=0"
    );
    assert!(!plain.recv_publish().await.retain);
    for c in [p, rap, plain] {
        c.disconnect().await;
    }
    b.stop().await;
}
