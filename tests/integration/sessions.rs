//! Sessions across connections: offline queues and their limit, wills, session takeover.

use crate::common::{cid, v3, v5, Broker, QUIET, WAIT};
use std::time::Duration;

const QUEUE_FULL: &str = r#"tern_messages_dropped_total{reason="queue_full"}"#;

fn v3_persistent(id: &str, port: u16) -> rumqttc::MqttOptions {
    let mut o = v3::opts(id, port);
    o.set_clean_session(false);
    o
}

// ---------------------------------------------------------------- offline queue, 3.1.1

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_persistent_session_offline_queue() {
    use rumqttc::QoS;
    let b = Broker::default().await;
    let id = cid("v3-oq");
    let mut s = v3::connect_with(v3_persistent(&id, b.port())).await;
    s.subscribe("oq/t", QoS::AtLeastOnce).await;
    s.disconnect().await;
    // Until the broker has seen the connection go, the session is online and a QoS 0 message
    // may still be queued for it.
    let offline = tokio::time::timeout(WAIT, async {
        while b.metric("tern_sessions{state=\"online\"}").await != Some(0.0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(offline.is_ok(), "the session went offline");

    let mut p = v3::connect(b.port(), &cid("v3-oq-pub")).await;
    p.publish("oq/t", QoS::AtMostOnce, false, b"qos0-not-queued")
        .await;
    for i in 0..10 {
        p.publish("oq/t", QoS::AtLeastOnce, false, format!("m{i}").as_bytes())
            .await;
    }

    let mut s = v3::connect_with(v3_persistent(&id, b.port())).await;
    assert!(s.connack.session_present);
    for i in 0..10 {
        let m = s.recv_publish().await;
        assert_eq!(
            String::from_utf8_lossy(&m.payload),
            format!("m{i}"),
            "queued messages in order, QoS 0 not queued"
        );
        assert_eq!(m.qos, QoS::AtLeastOnce);
    }
    s.expect_no_publish(QUIET).await;

    // The subscription survived: live delivery works without re-subscribing.
    p.publish("oq/t", QoS::AtLeastOnce, false, b"live").await;
    assert_eq!(&s.recv_publish().await.payload[..], b"live");
    s.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_offline_queue_limit_drops_and_counts() {
    use rumqttc::QoS;
    let b = Broker::start("[limits]\nmax_queued_messages = 5\n").await;
    let id = cid("v3-ql");
    let mut s = v3::connect_with(v3_persistent(&id, b.port())).await;
    s.subscribe("ql/t", QoS::AtLeastOnce).await;
    s.disconnect().await;

    let mut p = v3::connect(b.port(), &cid("v3-ql-pub")).await;
    for i in 0..8 {
        p.publish("ql/t", QoS::AtLeastOnce, false, format!("m{i}").as_bytes())
            .await;
    }
    let mut s = v3::connect_with(v3_persistent(&id, b.port())).await;
    assert!(s.connack.session_present);
    let mut got = Vec::new();
    while let Some(m) = s.try_recv_publish(Duration::from_millis(700)).await {
        got.push(String::from_utf8_lossy(&m.payload).into_owned());
        assert!(got.len() <= 8);
    }
    assert_eq!(
        got,
        vec!["m0", "m1", "m2", "m3", "m4"],
        "the first 5 are kept, newer ones dropped"
    );
    assert_eq!(b.metric(QUEUE_FULL).await, Some(3.0));
    s.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- offline queue, v5

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_persistent_session_offline_queue() {
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::default().await;
    let id = cid("v5-oq");
    let mut s = v5::connect_with(v5::persistent_opts(&id, b.port(), 300)).await;
    assert!(!s.connack.session_present);
    s.subscribe("oq/t", QoS::ExactlyOnce).await;
    s.disconnect().await;

    let mut p = v5::connect(b.port(), &cid("v5-oq-pub")).await;
    p.publish("oq/t", QoS::AtMostOnce, false, b"qos0-not-queued")
        .await;
    for i in 0..10 {
        let qos = if i % 2 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        p.publish("oq/t", qos, false, format!("m{i}").as_bytes())
            .await;
    }

    let mut s = v5::connect_with(v5::persistent_opts(&id, b.port(), 300)).await;
    assert!(s.connack.session_present);
    let mut got = Vec::new();
    for _ in 0..10 {
        let m = s.recv_publish().await;
        got.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "queued messages in order, QoS 0 not queued");
    s.expect_no_publish(QUIET).await;
    p.publish("oq/t", QoS::AtLeastOnce, false, b"live").await;
    assert_eq!(&s.recv_publish().await.payload[..], b"live");
    s.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_offline_queue_limit_drops_and_counts() {
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::start("[limits]\nmax_queued_messages = 5\n").await;
    let id = cid("v5-ql");
    let mut s = v5::connect_with(v5::persistent_opts(&id, b.port(), 300)).await;
    s.subscribe("ql/t", QoS::AtLeastOnce).await;
    s.disconnect().await;

    let mut p = v5::connect(b.port(), &cid("v5-ql-pub")).await;
    for i in 0..8 {
        p.publish("ql/t", QoS::AtLeastOnce, false, format!("m{i}").as_bytes())
            .await;
    }
    let mut s = v5::connect_with(v5::persistent_opts(&id, b.port(), 300)).await;
    assert!(s.connack.session_present);
    let mut got = Vec::new();
    while let Some(m) = s.try_recv_publish(Duration::from_millis(700)).await {
        got.push(String::from_utf8_lossy(&m.payload).into_owned());
        assert!(got.len() <= 8);
    }
    assert_eq!(got, vec!["m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(b.metric(QUEUE_FULL).await, Some(3.0));
    s.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- wills

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_will_on_abnormal_close() {
    use rumqttc::{LastWill, QoS};
    let b = Broker::default().await;
    let id = cid("v3-will");
    let topic = format!("will/{id}");
    let mut watcher = v3::connect(b.port(), &cid("v3-will-watch")).await;
    watcher.subscribe(&topic, QoS::AtLeastOnce).await;

    let mut o = v3::opts(&id, b.port());
    o.set_last_will(LastWill::new(&topic, "gone", QoS::AtLeastOnce, true));
    let w = v3::connect_with(o).await;
    watcher.expect_no_publish(Duration::from_millis(200)).await;
    w.kill().await;

    let m = watcher.recv_publish().await;
    assert_eq!(m.topic, topic);
    assert_eq!(&m.payload[..], b"gone");
    assert_eq!(m.qos, QoS::AtLeastOnce);
    watcher.expect_no_publish(QUIET).await;

    // Will retain honoured: a new subscriber gets it as a retained message.
    let mut late = v3::connect(b.port(), &cid("v3-will-late")).await;
    late.subscribe(&topic, QoS::AtLeastOnce).await;
    let m = late.recv_publish().await;
    assert_eq!(&m.payload[..], b"gone");
    assert!(m.retain);
    late.disconnect().await;
    watcher.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_no_will_on_clean_disconnect() {
    use rumqttc::{LastWill, QoS};
    let b = Broker::default().await;
    let id = cid("v3-nowill");
    let topic = format!("will/{id}");
    let mut watcher = v3::connect(b.port(), &cid("v3-nowill-watch")).await;
    watcher.subscribe(&topic, QoS::AtLeastOnce).await;
    let mut o = v3::opts(&id, b.port());
    o.set_last_will(LastWill::new(&topic, "gone", QoS::AtLeastOnce, false));
    let w = v3::connect_with(o).await;
    w.disconnect().await;
    watcher.expect_no_publish(Duration::from_secs(1)).await;
    watcher.disconnect().await;
    b.stop().await;
}

fn v5_will(topic: &str, retain: bool) -> rumqttc::v5::mqttbytes::v5::LastWill {
    use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties};
    use rumqttc::v5::mqttbytes::QoS;
    let props = LastWillProperties {
        delay_interval: None,
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: Some("text/plain".into()),
        response_topic: None,
        correlation_data: None,
        user_properties: vec![("why".into(), "test".into())],
    };
    LastWill::new(topic, "gone", QoS::AtLeastOnce, retain, Some(props))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_will_on_abnormal_close() {
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::default().await;
    let id = cid("v5-will");
    let topic = format!("will/{id}");
    let mut watcher = v5::connect(b.port(), &cid("v5-will-watch")).await;
    watcher.subscribe(&topic, QoS::AtLeastOnce).await;
    let mut o = v5::opts(&id, b.port());
    o.set_last_will(v5_will(&topic, false));
    let w = v5::connect_with(o).await;
    watcher.expect_no_publish(Duration::from_millis(200)).await;
    w.kill().await;

    let m = watcher.recv_publish().await;
    assert_eq!(&m.topic[..], topic.as_bytes());
    assert_eq!(&m.payload[..], b"gone");
    assert_eq!(m.qos, QoS::AtLeastOnce);
    let props = m.properties.expect("will properties forwarded");
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        props.user_properties,
        vec![("why".to_string(), "test".to_string())]
    );
    watcher.expect_no_publish(QUIET).await;
    watcher.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_no_will_on_clean_disconnect() {
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::default().await;
    let id = cid("v5-nowill");
    let topic = format!("will/{id}");
    let mut watcher = v5::connect(b.port(), &cid("v5-nowill-watch")).await;
    watcher.subscribe(&topic, QoS::AtLeastOnce).await;
    let mut o = v5::opts(&id, b.port());
    o.set_last_will(v5_will(&topic, false));
    let w = v5::connect_with(o).await;
    w.disconnect().await;
    watcher.expect_no_publish(Duration::from_secs(1)).await;
    watcher.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- takeover

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_takeover_closes_old_connection() {
    use rumqttc::{LastWill, QoS};
    let b = Broker::default().await;
    let id = cid("v3-take");
    let will_topic = format!("will/{id}");
    let mut watcher = v3::connect(b.port(), &cid("v3-take-watch")).await;
    watcher.subscribe(&will_topic, QoS::AtLeastOnce).await;

    let mut o = v3::opts(&id, b.port());
    o.set_last_will(LastWill::new(&will_topic, "old", QoS::AtLeastOnce, false));
    let mut first = v3::connect_with(o).await;
    let mut second = v3::connect(b.port(), &id).await;
    assert!(
        first.wait_closed(WAIT).await.is_some(),
        "the first connection was not closed on takeover [MQTT-3.1.4-2]"
    );
    // The old connection did not DISCONNECT: its will is published.
    assert_eq!(&watcher.recv_publish().await.payload[..], b"old");

    // The new connection works.
    second.subscribe("take/t", QoS::AtLeastOnce).await;
    second
        .publish("take/t", QoS::AtLeastOnce, false, b"still here")
        .await;
    assert_eq!(&second.recv_publish().await.payload[..], b"still here");
    second.disconnect().await;
    watcher.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_takeover_sends_session_taken_over() {
    use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::default().await;
    let id = cid("v5-take");
    let will_topic = format!("will/{id}");
    let mut watcher = v5::connect(b.port(), &cid("v5-take-watch")).await;
    watcher.subscribe(&will_topic, QoS::AtLeastOnce).await;

    let mut o = v5::persistent_opts(&id, b.port(), 60);
    o.set_last_will(v5_will(&will_topic, false));
    let mut first = v5::connect_with(o).await;
    first.subscribe("take/t", QoS::AtLeastOnce).await;

    let mut second = v5::connect_with(v5::persistent_opts(&id, b.port(), 60)).await;
    assert!(
        second.connack.session_present,
        "session continues on takeover"
    );
    match first.wait_closed(WAIT).await {
        Some(v5::Closed::ServerDisconnect(DisconnectReasonCode::SessionTakenOver)) => {}
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert_eq!(&watcher.recv_publish().await.payload[..], b"gone");

    // The subscription moved to the new connection.
    second
        .publish("take/t", QoS::AtLeastOnce, false, b"still here")
        .await;
    assert_eq!(&second.recv_publish().await.payload[..], b"still here");
    second.disconnect().await;
    watcher.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- redelivery, expiry, will delay

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_unacked_messages_resent_with_dup_on_reconnect() {
    use rumqttc::QoS;
    let b = Broker::default().await;
    let id = cid("v3-dup");
    let mut o = v3_persistent(&id, b.port());
    o.set_manual_acks(true);
    let mut s = v3::connect_with(o).await;
    s.subscribe("dup/t", QoS::AtLeastOnce).await;
    let mut p = v3::connect(b.port(), &cid("v3-dup-pub")).await;
    for i in 0..3 {
        p.publish("dup/t", QoS::AtLeastOnce, false, format!("m{i}").as_bytes())
            .await;
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        let m = s.recv_publish().await;
        assert!(!m.dup);
        first.push((m.pkid, m.payload.clone()));
    }
    // Ack only the first, then vanish.
    let acked = first.remove(0);
    let ack = rumqttc::Publish {
        pkid: acked.0,
        ..rumqttc::Publish::new("dup/t", QoS::AtLeastOnce, acked.1.to_vec())
    };
    s.client.ack(&ack).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.kill().await;

    let mut s = v3::connect_with(v3_persistent(&id, b.port())).await;
    assert!(s.connack.session_present);
    for (pkid, payload) in first {
        let m = s.recv_publish().await;
        assert_eq!(m.payload, payload, "re-sent in original order");
        assert!(m.dup, "re-sent PUBLISH must have DUP=1 [MQTT-4.4.0-1]");
        assert_eq!(m.pkid, pkid, "re-sent with the same packet id");
    }
    s.expect_no_publish(QUIET).await;
    s.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_unacked_messages_resent_with_dup_on_reconnect() {
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::default().await;
    let id = cid("v5-dup");
    let mut o = v5::persistent_opts(&id, b.port(), 60);
    o.set_manual_acks(true);
    let mut s = v5::connect_with(o).await;
    s.subscribe("dup/t", QoS::AtLeastOnce).await;
    let mut p = v5::connect(b.port(), &cid("v5-dup-pub")).await;
    for i in 0..3 {
        p.publish("dup/t", QoS::AtLeastOnce, false, format!("m{i}").as_bytes())
            .await;
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        let m = s.recv_publish().await;
        first.push(m);
    }
    let acked = first.remove(0);
    s.client.ack(&acked).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.kill().await;

    let mut s = v5::connect_with(v5::persistent_opts(&id, b.port(), 60)).await;
    assert!(s.connack.session_present);
    for old in first {
        let m = s.recv_publish().await;
        assert_eq!(m.payload, old.payload, "re-sent in original order");
        assert!(m.dup, "re-sent PUBLISH must have DUP=1");
        assert_eq!(m.pkid, old.pkid, "re-sent with the same packet id");
    }
    s.expect_no_publish(QUIET).await;
    s.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_session_expires_after_interval() {
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::default().await;
    let id = cid("v5-sexp");
    let mut s = v5::connect_with(v5::persistent_opts(&id, b.port(), 1)).await;
    s.subscribe("sexp/t", QoS::AtLeastOnce).await;
    s.disconnect().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut p = v5::connect(b.port(), &cid("v5-sexp-pub")).await;
    p.publish("sexp/t", QoS::AtLeastOnce, false, b"x").await;
    let mut s = v5::connect_with(v5::persistent_opts(&id, b.port(), 60)).await;
    assert!(
        !s.connack.session_present,
        "session outlived its expiry interval"
    );
    s.expect_no_publish(QUIET).await;
    s.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

fn delayed_will(topic: &str, delay: u32) -> rumqttc::v5::mqttbytes::v5::LastWill {
    let mut w = v5_will(topic, false);
    if let Some(p) = w.properties.as_mut() {
        p.delay_interval = Some(delay);
    }
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_will_delay_interval() {
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::default().await;
    let id = cid("v5-wd");
    let topic = format!("will/{id}");
    let mut watcher = v5::connect(b.port(), &cid("v5-wd-watch")).await;
    watcher.subscribe(&topic, QoS::AtLeastOnce).await;
    let mut o = v5::persistent_opts(&id, b.port(), 60);
    o.set_last_will(delayed_will(&topic, 2));
    let w = v5::connect_with(o).await;
    let lost = tokio::time::Instant::now();
    w.kill().await;
    watcher.expect_no_publish(Duration::from_millis(1200)).await;
    let m = watcher.recv_publish().await;
    assert_eq!(&m.payload[..], b"gone");
    let after = lost.elapsed();
    assert!(
        after >= Duration::from_millis(1800),
        "will published after {after:?}, before its 2 s delay"
    );
    watcher.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_reconnect_within_will_delay_cancels_will() {
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::default().await;
    let id = cid("v5-wdc");
    let topic = format!("will/{id}");
    let mut watcher = v5::connect(b.port(), &cid("v5-wdc-watch")).await;
    watcher.subscribe(&topic, QoS::AtLeastOnce).await;
    let mut o = v5::persistent_opts(&id, b.port(), 60);
    o.set_last_will(delayed_will(&topic, 2));
    let w = v5::connect_with(o).await;
    w.kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let back = v5::connect_with(v5::persistent_opts(&id, b.port(), 60)).await;
    assert!(back.connack.session_present);
    watcher.expect_no_publish(Duration::from_secs(3)).await;
    back.disconnect().await;
    watcher.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_shutdown_closes_connections() {
    let b = Broker::default().await;
    let mut c = v3::connect(b.port(), &cid("v3-shut")).await;
    b.stop().await;
    assert!(c.wait_closed(WAIT).await.is_some());
}
