//! Sessions across connections: offline queues and their limit, wills, session takeover,
//! redelivery after reconnect and broker shutdown, each written once for 3.1.1 and 5.0
//! (`both_versions!`); then what only 5.0 has: will properties, Session Expiry and Will Delay.

use crate::common::any::Version;
use crate::common::{cid, v5, Broker, QUIET, WAIT};
use std::time::Duration;

const QUEUE_FULL: &str = r#"tern_messages_dropped_total{reason="queue_full"}"#;

both_versions!(
    persistent_session_offline_queue,
    offline_queue_limit_drops_and_counts,
    will_on_abnormal_close,
    no_will_on_clean_disconnect,
    takeover_closes_old_connection,
    takeover_of_persistent_session_keeps_it,
    unacked_messages_resent_with_dup_on_reconnect,
    shutdown_closes_connections,
);

// ---------------------------------------------------------------- offline queue

async fn persistent_session_offline_queue(v: Version) {
    let b = Broker::default().await;
    let id = v.cid("oq");
    let mut s = v.opts(&id, b.port()).persistent().connect().await;
    assert!(!s.session_present());
    s.subscribe("oq/t", 2).await;
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

    let mut p = v.connect(b.port(), &v.cid("oq-pub")).await;
    p.publish("oq/t", 0, false, b"qos0-not-queued").await;
    let qos = |i: u8| 1 + i % 2;
    for i in 0..10u8 {
        p.publish("oq/t", qos(i), false, format!("m{i}").as_bytes())
            .await;
    }

    let mut s = v.opts(&id, b.port()).persistent().connect().await;
    assert!(s.session_present());
    for i in 0..10u8 {
        let m = s.recv_publish().await;
        assert_eq!(
            String::from_utf8_lossy(&m.payload),
            format!("m{i}"),
            "queued messages in order, QoS 0 not queued"
        );
        assert_eq!(m.qos, qos(i), "m{i}");
    }
    s.expect_no_publish(QUIET).await;

    // The subscription survived: live delivery works without re-subscribing.
    p.publish("oq/t", 1, false, b"live").await;
    assert_eq!(&s.recv_publish().await.payload[..], b"live");
    s.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

async fn offline_queue_limit_drops_and_counts(v: Version) {
    let b = Broker::start("[limits]\nmax_queued_messages_persistent = 5\n").await;
    let id = v.cid("ql");
    let mut s = v.opts(&id, b.port()).persistent().connect().await;
    s.subscribe("ql/t", 1).await;
    s.disconnect().await;

    let mut p = v.connect(b.port(), &v.cid("ql-pub")).await;
    for i in 0..5 {
        p.publish("ql/t", 1, false, format!("m{i}").as_bytes())
            .await;
    }
    // The sixth finds the only matching queue full: dropped and counted; a 5.0 publisher is
    // told so (0x97 Quota exceeded, which rumqttc treats as fatal), a 3.1.1 one cannot be.
    let rc = p.publish_rc("ql/t", b"m5").await;
    assert_eq!(rc, if v == Version::V5 { 0x97 } else { 0x00 });
    let mut s = v.opts(&id, b.port()).persistent().connect().await;
    assert!(s.session_present());
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
    assert_eq!(b.metric(QUEUE_FULL).await, Some(1.0));
    s.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- wills

async fn will_on_abnormal_close(v: Version) {
    let b = Broker::default().await;
    let id = v.cid("will");
    let topic = format!("will/{id}");
    let mut watcher = v.connect(b.port(), &v.cid("will-watch")).await;
    watcher.subscribe(&topic, 1).await;

    let w = v
        .opts(&id, b.port())
        .will(&topic, b"gone", 1, true)
        .connect()
        .await;
    watcher.expect_no_publish(Duration::from_millis(200)).await;
    w.kill().await;

    let m = watcher.recv_publish().await;
    assert_eq!(m.topic, topic);
    assert_eq!(&m.payload[..], b"gone");
    assert_eq!(m.qos, 1);
    watcher.expect_no_publish(QUIET).await;

    // Will retain honoured: a new subscriber gets it as a retained message.
    let mut late = v.connect(b.port(), &v.cid("will-late")).await;
    late.subscribe(&topic, 1).await;
    let m = late.recv_publish().await;
    assert_eq!(&m.payload[..], b"gone");
    assert!(m.retain);
    late.disconnect().await;
    watcher.disconnect().await;
    b.stop().await;
}

async fn no_will_on_clean_disconnect(v: Version) {
    let b = Broker::default().await;
    let id = v.cid("nowill");
    let topic = format!("will/{id}");
    let mut watcher = v.connect(b.port(), &v.cid("nowill-watch")).await;
    watcher.subscribe(&topic, 1).await;
    let w = v
        .opts(&id, b.port())
        .will(&topic, b"gone", 1, false)
        .connect()
        .await;
    w.disconnect().await;
    watcher.expect_no_publish(Duration::from_secs(1)).await;
    watcher.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- takeover

/// The old connection is closed [MQTT-3.1.4-2]: 3.1.1 just closes it, 5.0 first sends
/// DISCONNECT 0x8E, Session taken over [MQTT-3.1.4-3].
fn taken_over(v: Version) -> Option<u8> {
    v.pick(None, Some(0x8E))
}

async fn takeover_closes_old_connection(v: Version) {
    let b = Broker::default().await;
    let id = v.cid("take");
    let will_topic = format!("will/{id}");
    let mut watcher = v.connect(b.port(), &v.cid("take-watch")).await;
    watcher.subscribe(&will_topic, 1).await;

    let mut first = v
        .opts(&id, b.port())
        .will(&will_topic, b"old", 1, false)
        .connect()
        .await;
    let mut second = v.connect(b.port(), &id).await;
    let closed = first
        .wait_closed(WAIT)
        .await
        .expect("the first connection was not closed on takeover [MQTT-3.1.4-2]");
    assert_eq!(closed.disconnect_reason(), taken_over(v));
    // The old connection did not DISCONNECT: its will is published.
    assert_eq!(&watcher.recv_publish().await.payload[..], b"old");

    // The new connection works.
    second.subscribe("take/t", 1).await;
    second.publish("take/t", 1, false, b"still here").await;
    assert_eq!(&second.recv_publish().await.payload[..], b"still here");
    second.disconnect().await;
    watcher.disconnect().await;
    b.stop().await;
}

async fn takeover_of_persistent_session_keeps_it(v: Version) {
    let b = Broker::default().await;
    let id = v.cid("take-p");
    let will_topic = format!("will/{id}");
    let mut watcher = v.connect(b.port(), &v.cid("take-p-watch")).await;
    watcher.subscribe(&will_topic, 1).await;

    let mut first = v
        .opts(&id, b.port())
        .persistent()
        .will(&will_topic, b"gone", 1, false)
        .connect()
        .await;
    first.subscribe("take/t", 1).await;

    let mut second = v.opts(&id, b.port()).persistent().connect().await;
    assert!(second.session_present(), "session continues on takeover");
    let closed = first
        .wait_closed(WAIT)
        .await
        .expect("the first connection was not closed on takeover");
    assert_eq!(closed.disconnect_reason(), taken_over(v));
    assert_eq!(&watcher.recv_publish().await.payload[..], b"gone");

    // The subscription moved to the new connection.
    second.publish("take/t", 1, false, b"still here").await;
    assert_eq!(&second.recv_publish().await.payload[..], b"still here");
    second.disconnect().await;
    watcher.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- redelivery, shutdown

async fn unacked_messages_resent_with_dup_on_reconnect(v: Version) {
    let b = Broker::default().await;
    let id = v.cid("dup");
    let mut s = v
        .opts(&id, b.port())
        .persistent()
        .manual_acks()
        .connect()
        .await;
    s.subscribe("dup/t", 1).await;
    let mut p = v.connect(b.port(), &v.cid("dup-pub")).await;
    for i in 0..3 {
        p.publish("dup/t", 1, false, format!("m{i}").as_bytes())
            .await;
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        let m = s.recv_publish().await;
        assert!(!m.dup);
        first.push(m);
    }
    // Ack only the first, then vanish.
    let acked = first.remove(0);
    s.ack(&acked).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.kill().await;

    let mut s = v.opts(&id, b.port()).persistent().connect().await;
    assert!(s.session_present());
    for old in first {
        let m = s.recv_publish().await;
        assert_eq!(m.payload, old.payload, "re-sent in original order");
        assert!(m.dup, "re-sent PUBLISH must have DUP=1 [MQTT-4.4.0-1]");
        assert_eq!(m.pkid, old.pkid, "re-sent with the same packet id");
    }
    s.expect_no_publish(QUIET).await;
    s.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

/// On shutdown 3.1.1 connections are just closed; 5.0 ones first get DISCONNECT 0x8B, Server
/// shutting down.
async fn shutdown_closes_connections(v: Version) {
    let b = Broker::default().await;
    let mut c = v.connect(b.port(), &v.cid("shut")).await;
    b.stop().await;
    let closed = c.wait_closed(WAIT).await.expect("connection closed");
    assert_eq!(closed.disconnect_reason(), v.pick(None, Some(0x8B)));
}

// ---------------------------------------------------------------- 5.0 only: will properties,
// session expiry, will delay

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
async fn v5_will_properties_forwarded() {
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
