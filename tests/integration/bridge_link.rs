//! The bridge link (`tern::bridge::link`) against a real Tern broker started in-process, as
//! the remote broker: publishes acknowledged back to their tokens through the window,
//! messages from a rumqttc client received and acknowledged by the owner, reconnecting with
//! backoff until the broker appears, and TLS. 3.1.1 and 5.0. Every wait is bounded.

use crate::common::{cid, v3, Broker, WAIT};
use crate::tls::{Certs, TlsBroker};
use bytes::Bytes;
use std::collections::HashSet;
use std::time::Duration;
use tern::bridge::client::{LinkOptions, Subscription};
use tern::bridge::link::{
    spawn, Backoff, Link, LinkConfig, LinkEvent, OutMessage, PushError, TlsClient,
};
use tern::protocol::{MqttStr, ProtocolVersion, PublishProperties, QoS};
use tokio::sync::watch;

fn link_config(port: u16, version: ProtocolVersion) -> LinkConfig {
    let mut options = LinkOptions::new(version, cid("bridge"));
    options.window = 32;
    options.connect_timeout = Duration::from_secs(2);
    options.subscriptions = vec![Subscription {
        filter: "from-remote/#".into(),
        qos: QoS::AtLeastOnce,
        no_local: true,
    }];
    LinkConfig {
        name: "test".into(),
        host: "127.0.0.1".into(),
        port,
        tls: None,
        options,
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(400),
        },
        events_capacity: 64,
    }
}

fn message(token: u64, topic: &str) -> OutMessage {
    OutMessage {
        token,
        topic: MqttStr::from(topic),
        payload: Bytes::from(format!("m{token}")),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: PublishProperties::default(),
        dup: false,
    }
}

/// The next event, or a panic after `WAIT`.
async fn next(link: &mut Link) -> LinkEvent {
    tokio::time::timeout(WAIT, link.events.recv())
        .await
        .expect("a link event in time")
        .expect("the link is running")
}

/// Waits for `Connected`, skipping failed attempts; returns the generation and how many
/// attempts failed first.
async fn connected(link: &mut Link, within: Duration) -> (u64, usize) {
    let mut failed = 0;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, link.events.recv()).await {
            Ok(Some(LinkEvent::Connected { generation, .. })) => return (generation, failed),
            Ok(Some(LinkEvent::ConnectFailed { .. })) => failed += 1,
            other => panic!("expected Connected, got {other:?}"),
        }
    }
}

/// Publishes `count` QoS 1 messages through the window and returns when all are acked.
async fn publish_all(link: &mut Link, count: u64, topic: &str) {
    let mut sent = 0u64;
    let mut acked = HashSet::new();
    let work = async {
        while (acked.len() as u64) < count {
            while sent < count {
                match link.handle.try_publish(&message(sent, topic)) {
                    Ok(_) => sent += 1,
                    Err(PushError::Full) => break,
                    Err(e) => panic!("try_publish: {e}"),
                }
            }
            tokio::select! {
                ev = link.events.recv() => match ev {
                    Some(LinkEvent::Acked { token, reason }) => {
                        assert!(reason < 0x80, "token {token} refused: 0x{reason:02x}");
                        assert!(acked.insert(token), "token {token} acked twice");
                    }
                    other => panic!("unexpected while publishing: {other:?}"),
                },
                _ = link.handle.room_changed() => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .expect("every publish acknowledged in time");
    assert_eq!(acked.len() as u64, count);
}

async fn stop(link: Link, stop: watch::Sender<bool>) {
    let _ = stop.send(true);
    tokio::time::timeout(WAIT, link.task)
        .await
        .expect("the link stops in time")
        .expect("the link task does not panic");
}

async fn round_trip(version: ProtocolVersion) {
    let broker = Broker::default().await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut link = spawn(link_config(broker.port(), version), stop_rx).expect("link starts");
    let (generation, _) = connected(&mut link, WAIT).await;
    assert_eq!(link.handle.room(), 32);

    // 1,000 QoS 1 messages out, each acknowledged to its token. A rumqttc subscriber on the
    // broker sees them too.
    let mut sub = v3::connect(broker.port(), &cid("sub")).await;
    sub.client
        .subscribe("to-remote/#", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    sub.next_where(WAIT, |e| {
        matches!(e, v3::Ev::Pkt(rumqttc::Packet::SubAck(_)))
    })
    .await
    .expect("SUBACK");
    publish_all(&mut link, 1000, "to-remote/data").await;
    let mut seen = 0;
    while seen < 1000 {
        match sub
            .next_where(WAIT, |e| {
                matches!(e, v3::Ev::Pkt(rumqttc::Packet::Publish(_)))
            })
            .await
        {
            Some(_) => seen += 1,
            None => panic!("subscriber got {seen} of 1000"),
        }
    }

    // Our own message on the subscribed filter: v5 No Local keeps it from coming back.
    publish_all(&mut link, 1, "from-remote/self").await;

    // A message from a rumqttc client comes in, and is acknowledged when the owner says.
    let publisher = v3::connect(broker.port(), &cid("pub")).await;
    publisher
        .client
        .publish("from-remote/x", rumqttc::QoS::AtLeastOnce, false, "hello")
        .await
        .expect("publish");
    let message = loop {
        match next(&mut link).await {
            LinkEvent::Message {
                generation: g,
                message,
            } => {
                assert_eq!(g, generation);
                if message.topic.as_str() == "from-remote/self" {
                    assert!(!version.is_v5(), "No Local did not hold in v5");
                    assert!(link.handle.ack_incoming(g, message.packet_id));
                    continue;
                }
                break message;
            }
            other => panic!("expected a message, got {other:?}"),
        }
    };
    assert_eq!(message.topic.as_str(), "from-remote/x");
    assert_eq!(&message.payload[..], b"hello");
    assert_eq!(message.qos, QoS::AtLeastOnce);
    assert!(link.handle.ack_incoming(generation, message.packet_id));
    assert!(
        !link.handle.ack_incoming(generation + 1, message.packet_id),
        "an ack for another connection is dropped"
    );

    stop(link, stop_tx).await;
    broker.stop().await;
}

#[tokio::test]
async fn link_round_trip_v311() {
    round_trip(ProtocolVersion::V3_1_1).await;
}

#[tokio::test]
async fn link_round_trip_v5() {
    round_trip(ProtocolVersion::V5).await;
}

/// The broker is not there at first: the link keeps trying with backoff, and connects once
/// it starts.
#[tokio::test]
async fn link_reconnects_until_the_broker_starts() {
    // A port nothing listens on (a small race with other tests for it is accepted).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut link = spawn(link_config(port, ProtocolVersion::V5), stop_rx).expect("link starts");
    let mut failures = 0;
    while failures < 3 {
        match next(&mut link).await {
            LinkEvent::ConnectFailed { retry_in, .. } => {
                assert!(retry_in <= Duration::from_millis(400));
                failures += 1;
            }
            other => panic!("expected a failed attempt, got {other:?}"),
        }
    }
    assert!(matches!(
        link.handle.try_publish(&message(1, "t")),
        Err(PushError::NotConnected)
    ));
    let broker = Broker::start_raw(&format!(
        "[listeners.tcp]\nbind = \"127.0.0.1:{port}\"\n[metrics]\nbind = \"127.0.0.1:0\"\n\
         [auth]\nallow_anonymous = true\n"
    ))
    .await;
    connected(&mut link, WAIT).await;
    publish_all(&mut link, 10, "to-remote/after").await;

    // The broker goes away: Disconnected, then attempts again; back: connected again.
    broker.stop().await;
    loop {
        match next(&mut link).await {
            LinkEvent::Disconnected { generation, .. } => {
                assert_eq!(generation, 1);
                break;
            }
            LinkEvent::Acked { .. } => {}
            other => panic!("expected Disconnected, got {other:?}"),
        }
    }
    assert_eq!(link.handle.room(), 0);
    stop(link, stop_tx).await;
}

/// The link over TLS: the broker's certificate checked against the test CA, with the
/// client certificate the listener requires.
#[tokio::test]
async fn link_over_tls_with_client_certificate() {
    let certs = Certs::generate();
    let broker = TlsBroker::start(&certs, true).await;
    let tls = tern::tls::client_config(
        &certs.path("ca.pem"),
        Some((&certs.path("client.pem"), &certs.path("client.key"))),
    )
    .expect("client TLS configuration");
    let mut cfg = link_config(broker.tls_port, ProtocolVersion::V3_1_1);
    cfg.tls = Some(TlsClient {
        config: tls,
        server_name: "127.0.0.1".into(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut link = spawn(cfg, stop_rx).expect("link starts");
    connected(&mut link, WAIT).await;
    publish_all(&mut link, 100, "to-remote/tls").await;
    stop(link, stop_tx).await;
    broker.stop().await;
}
