//! Byte-level checks that rumqttc cannot express: re-sent inbound QoS 2 PUBLISH (exactly once,
//! also across a reconnect), PUBREL for an unknown id, v5 DISCONNECT 0x04 (publish the will).

use crate::common::{cid, v3, Broker, QUIET, WAIT};
use rumqttc::QoS;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// CONNECT for level 4 (3.1.1) or 5; `will` = (topic, payload, qos).
fn connect(level: u8, id: &str, clean: bool, will: Option<(&str, &[u8], u8)>) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(level);
    let mut flags = if clean { 0x02 } else { 0 };
    if let Some((_, _, qos)) = will {
        flags |= 0x04 | (qos << 3);
    }
    body.push(flags);
    body.extend_from_slice(&30u16.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    string(&mut body, id.as_bytes());
    if let Some((topic, payload, _)) = will {
        if level == 5 {
            body.push(0); // no will properties
        }
        string(&mut body, topic.as_bytes());
        string(&mut body, payload);
    }
    packet(0x10, &body)
}

fn publish_qos2(level: u8, topic: &str, pkid: u16, dup: bool, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic.as_bytes());
    body.extend_from_slice(&pkid.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x34 | if dup { 0x08 } else { 0 }, &body)
}

struct Raw {
    s: TcpStream,
}

impl Raw {
    async fn open(addr: SocketAddr) -> Raw {
        let s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        Raw { s }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write");
    }

    /// Reads one packet: (first byte, body).
    async fn read(&mut self) -> (u8, Vec<u8>) {
        tokio::time::timeout(WAIT, async {
            let first = self.s.read_u8().await.expect("read fixed header");
            let mut len = 0usize;
            let mut mult = 1usize;
            loop {
                let b = self.s.read_u8().await.expect("read remaining length");
                len += (b & 0x7f) as usize * mult;
                mult *= 128;
                if b & 0x80 == 0 {
                    break;
                }
            }
            let mut body = vec![0; len];
            self.s.read_exact(&mut body).await.expect("read body");
            (first, body)
        })
        .await
        .expect("packet within timeout")
    }

    /// Reads CONNACK and returns (session present, return/reason code).
    async fn connack(&mut self) -> (bool, u8) {
        let (first, body) = self.read().await;
        assert_eq!(first, 0x20, "expected CONNACK");
        (body[0] & 1 == 1, body[1])
    }

    /// Reads an ack of type `first` and returns its packet id.
    async fn ack(&mut self, first: u8) -> u16 {
        let (got, body) = self.read().await;
        assert_eq!(got, first, "unexpected packet type, body {body:?}");
        u16::from_be_bytes([body[0], body[1]])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_inbound_qos2_exactly_once_across_reconnect() {
    let b = Broker::default().await;
    let mut sub = v3::connect(b.port(), &cid("raw-x2-sub")).await;
    sub.subscribe("x2/t", QoS::ExactlyOnce).await;
    let id = cid("raw-x2");

    let mut r = Raw::open(b.tcp).await;
    r.send(&connect(4, &id, false, None)).await;
    assert_eq!(r.connack().await, (false, 0));
    r.send(&publish_qos2(4, "x2/t", 7, false, b"once")).await;
    assert_eq!(r.ack(0x50).await, 7, "PUBREC");
    // Re-sent before PUBREL: PUBREC again, no second delivery [MQTT-4.3.3-2].
    r.send(&publish_qos2(4, "x2/t", 7, true, b"once")).await;
    assert_eq!(r.ack(0x50).await, 7, "PUBREC for the duplicate");
    drop(r);

    // Again after a reconnect of the persistent session.
    let mut r = Raw::open(b.tcp).await;
    r.send(&connect(4, &id, false, None)).await;
    assert_eq!(r.connack().await, (true, 0));
    r.send(&publish_qos2(4, "x2/t", 7, true, b"once")).await;
    assert_eq!(r.ack(0x50).await, 7);
    r.send(&[0x62, 0x02, 0x00, 0x07]).await; // PUBREL 7
    assert_eq!(r.ack(0x70).await, 7, "PUBCOMP");
    // PUBREL for an id nobody is waiting for still gets PUBCOMP.
    r.send(&[0x62, 0x02, 0x00, 0x63]).await;
    assert_eq!(r.ack(0x70).await, 0x63);

    let m = sub.recv_publish().await;
    assert_eq!(&m.payload[..], b"once");
    sub.expect_no_publish(QUIET).await;
    r.send(&[0xe0, 0x00]).await;
    sub.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_disconnect_with_will_message_publishes_will() {
    let b = Broker::default().await;
    let id = cid("raw-dw");
    let topic = format!("will/{id}");
    let mut watcher = v3::connect(b.port(), &cid("raw-dw-watch")).await;
    watcher.subscribe(&topic, QoS::AtLeastOnce).await;

    let mut r = Raw::open(b.tcp).await;
    r.send(&connect(5, &id, true, Some((&topic, b"bye", 1))))
        .await;
    assert_eq!(r.connack().await.1, 0);
    r.send(&[0xe0, 0x02, 0x04, 0x00]).await; // DISCONNECT 0x04
    let m = watcher.recv_publish().await;
    assert_eq!(&m.payload[..], b"bye");
    drop(r);

    // The same with a normal DISCONNECT (e0 00): no will.
    let mut r = Raw::open(b.tcp).await;
    r.send(&connect(5, &id, true, Some((&topic, b"bye", 1))))
        .await;
    assert_eq!(r.connack().await.1, 0);
    r.send(&[0xe0, 0x00]).await;
    watcher
        .expect_no_publish(std::time::Duration::from_secs(1))
        .await;
    watcher.disconnect().await;
    b.stop().await;
}
