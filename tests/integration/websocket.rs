//! MQTT over WebSockets (`[listeners.ws]`): rumqttc 3.1.1 and 5.0 clients over ws talking to
//! TCP clients both ways (with a payload bigger than one outgoing frame), sessions created over
//! ws and resumed over TCP (and back), a raw RFC 6455 client (CONNECT split over three binary
//! frames and over three fragments of one message, CONNECT+SUBSCRIBE+PINGREQ joined in one
//! frame, ping/pong, a text frame closing the connection and publishing the will) and the
//! `tern_websocket_handshakes_total` counters.

use crate::common::any::{Client, Opts, Version};
use crate::common::{cid, v3, v5, Broker, QUIET, WAIT};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::WebSocketStream;
use tungstenite::client::IntoClientRequest;
use tungstenite::http::{header, HeaderValue};
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::Message;

/// A `[listeners.ws]` on a free loopback port, default path `/mqtt`, next to the base TCP one.
const WS_CONFIG: &str = "[listeners.ws]\nbind = \"127.0.0.1:0\"\n";

async fn ws_broker() -> Broker {
    Broker::start(WS_CONFIG).await
}

fn ws_addr(b: &Broker) -> SocketAddr {
    b.ws.expect("ws listener bound")
}

/// rumqttc 3.1.1 options for the broker's ws listener (same keep alive and limits as
/// `v3::opts`); clean session = true.
fn v3_ws_opts(id: &str, b: &Broker) -> rumqttc::MqttOptions {
    let addr = ws_addr(b);
    let mut o = rumqttc::MqttOptions::new(id, format!("ws://{addr}/mqtt"), addr.port());
    o.set_transport(rumqttc::Transport::Ws);
    o.set_keep_alive(std::time::Duration::from_secs(30));
    o.set_max_packet_size(1024 * 1024, 1024 * 1024);
    o
}

/// rumqttc 5.0 options for the broker's ws listener (same as `v5::opts`); clean start.
fn v5_ws_opts(id: &str, b: &Broker) -> rumqttc::v5::MqttOptions {
    let addr = ws_addr(b);
    let mut o = rumqttc::v5::MqttOptions::new(id, format!("ws://{addr}/mqtt"), addr.port());
    o.set_transport(rumqttc::Transport::Ws);
    o.set_keep_alive(std::time::Duration::from_secs(30));
    o.set_max_packet_size(Some(1024 * 1024));
    o
}

/// Bigger than the 64 KiB the broker puts in one outgoing binary frame, so a delivery to a ws
/// client spans several frames.
fn big_payload() -> Vec<u8> {
    (0..200_000u32).map(|i| (i % 251) as u8).collect()
}

/// [`v3_ws_opts`] or [`v5_ws_opts`].
fn ws_opts(v: Version, id: &str, b: &Broker) -> Opts {
    match v {
        Version::V311 => Opts::V3(v3_ws_opts(id, b)),
        Version::V5 => Opts::V5(v5_ws_opts(id, b)),
    }
}

both_versions!(
    ws_pubsub_with_tcp_both_ways,
    ws_session_moves_between_ws_and_tcp
);

// ---------------------------------------------------------------------------------------------
// Between ws and TCP clients
// ---------------------------------------------------------------------------------------------

async fn ws_pubsub_with_tcp_both_ways(v: Version) {
    let b = ws_broker().await;
    let mut ws = ws_opts(v, &v.cid("ws-sub"), &b).connect().await;
    if let Client::V5(c) = &ws {
        // The CONNACK properties made it over ws too.
        let props = c.connack.properties.clone().expect("CONNACK properties");
        assert_eq!(props.max_packet_size, Some(1_048_576));
    }
    let mut tcp = v.connect(b.port(), &v.cid("tcp-pub")).await;
    let down = format!("wsx/{v}/down");
    let up = format!("wsx/{v}/up");

    // TCP publishes, the ws client receives.
    assert_eq!(ws.subscribe(&format!("{down}/#"), 1).await, vec![1]);
    tcp.publish(&format!("{down}/a"), 1, false, b"to ws").await;
    let p = ws.recv_publish().await;
    assert_eq!(p.topic, format!("{down}/a"));
    assert_eq!(p.qos, 1);
    assert_eq!(&p.payload[..], b"to ws");
    let big = big_payload();
    tcp.publish(&format!("{down}/big"), 1, false, &big).await;
    let p = ws.recv_publish().await;
    assert_eq!(p.topic, format!("{down}/big"));
    assert!(p.payload[..] == big[..], "large payload arrived intact");

    // The ws client publishes, the TCP client receives.
    tcp.subscribe(&format!("{up}/#"), 1).await;
    ws.publish(&format!("{up}/b"), 1, false, b"from ws").await;
    let p = tcp.recv_publish().await;
    assert_eq!(p.topic, format!("{up}/b"));
    assert_eq!(p.qos, 1);
    assert_eq!(&p.payload[..], b"from ws");
    ws.publish(&format!("{up}/big"), 1, false, &big).await;
    let p = tcp.recv_publish().await;
    assert!(p.payload[..] == big[..], "large payload arrived intact");

    // Nothing else crossed over (no duplicates, no echo of the other direction).
    ws.expect_no_publish(QUIET).await;
    tcp.expect_no_publish(QUIET).await;
    ws.disconnect().await;
    tcp.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// One session, several transports
// ---------------------------------------------------------------------------------------------

async fn ws_session_moves_between_ws_and_tcp(v: Version) {
    let b = ws_broker().await;
    let id = v.cid("ws-persist");
    let topic = format!("wsp/{v}/t");
    let mut publisher = v.connect(b.port(), &v.cid("ws-persist-pub")).await;

    // Created over ws: a persistent session, one QoS 1 subscription.
    let mut c = ws_opts(v, &id, &b).persistent().connect().await;
    assert!(!c.session_present());
    c.subscribe(&topic, 1).await;
    c.disconnect().await;

    // Queued while away.
    for i in 0..3u8 {
        publisher.publish(&topic, 1, false, &[b'a' + i]).await;
    }

    // Back over TCP: the same session, its queue, then its subscription still live.
    let mut c = v.opts(&id, b.port()).persistent().connect().await;
    assert!(c.session_present(), "session made over ws resumed over TCP");
    for want in [b"a", b"b", b"c"] {
        let p = c.recv_publish().await;
        assert_eq!(p.topic, topic);
        assert_eq!(p.qos, 1);
        assert_eq!(&p.payload[..], want);
    }
    publisher.publish(&topic, 1, false, b"live-tcp").await;
    assert_eq!(&c.recv_publish().await.payload[..], b"live-tcp");
    c.expect_no_publish(QUIET).await;
    c.disconnect().await;

    // And back over ws again.
    publisher.publish(&topic, 1, false, b"queued-2").await;
    let mut c = ws_opts(v, &id, &b).persistent().connect().await;
    assert!(c.session_present(), "session resumed over ws again");
    assert_eq!(&c.recv_publish().await.payload[..], b"queued-2");
    c.expect_no_publish(QUIET).await;
    c.disconnect().await;
    publisher.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// A raw WebSocket client carrying hand-encoded MQTT packets
// ---------------------------------------------------------------------------------------------

type Ws = WebSocketStream<TcpStream>;

/// Opens a WebSocket to `path` on `addr`, offering the `mqtt` subprotocol.
async fn ws_client(
    addr: SocketAddr,
    path: &str,
) -> Result<(Ws, tungstenite::handshake::client::Response), tungstenite::Error> {
    let mut req = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("valid request");
    req.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("mqtt"),
    );
    tokio::time::timeout(WAIT, async move {
        let tcp = TcpStream::connect(addr)
            .await
            .expect("connect to ws listener");
        tokio_tungstenite::client_async(req, tcp).await
    })
    .await
    .expect("WebSocket handshake in time")
}

/// [`ws_client`] to `/mqtt`, which must succeed and select `mqtt`.
async fn ws_open(addr: SocketAddr) -> Ws {
    let (ws, resp) = ws_client(addr, "/mqtt").await.expect("upgrade accepted");
    assert_eq!(resp.status().as_u16(), 101);
    assert_eq!(
        resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL),
        Some(&HeaderValue::from_static("mqtt")),
        "the broker selects the mqtt subprotocol"
    );
    ws
}

async fn send_binary(ws: &mut Ws, data: &[u8]) {
    tokio::time::timeout(WAIT, ws.send(Message::Binary(data.to_vec().into())))
        .await
        .expect("send in time")
        .expect("send binary frame");
}

fn encode_len(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

/// Decodes a Variable Byte Integer at the start of `buf`: (value, bytes used), None if cut off.
fn decode_len(buf: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, b) in buf.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    assert!(buf.len() < 4, "malformed remaining length {buf:?}");
    None
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    encode_len(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// CONNECT (protocol level 4 or 5), clean session, keep alive 60, optionally a QoS 0 will.
fn connect_packet(level: u8, id: &str, will: Option<(&str, &[u8])>) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    let flags = if will.is_some() { 0x06 } else { 0x02 };
    body.extend_from_slice(&[level, flags, 0x00, 0x3c]);
    if level == 5 {
        body.push(0); // no properties
    }
    put_str(&mut body, id.as_bytes());
    if let Some((topic, payload)) = will {
        if level == 5 {
            body.push(0); // no will properties
        }
        put_str(&mut body, topic.as_bytes());
        put_str(&mut body, payload);
    }
    packet(0x10, &body)
}

/// SUBSCRIBE with packet id 1 to one filter at QoS 1.
fn subscribe_packet(level: u8, filter: &str) -> Vec<u8> {
    let mut body = vec![0x00, 0x01];
    if level == 5 {
        body.push(0);
    }
    put_str(&mut body, filter.as_bytes());
    body.push(0x01);
    packet(0x82, &body)
}

const PINGREQ: [u8; 2] = [0xc0, 0x00];

/// Reads MQTT packets off the binary frames of a raw ws connection, whatever the frame
/// boundaries.
struct PacketReader {
    buf: Vec<u8>,
}

impl PacketReader {
    fn new() -> Self {
        PacketReader { buf: Vec::new() }
    }

    fn take_packet(&mut self) -> Option<Vec<u8>> {
        let (len, used) = decode_len(self.buf.get(1..)?)?;
        let total = 1 + used + len;
        if self.buf.len() < total {
            return None;
        }
        Some(self.buf.drain(..total).collect())
    }

    /// The next whole packet; panics on timeout, on a text or close frame, or at end of stream.
    async fn next(&mut self, ws: &mut Ws) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(p) = self.take_packet() {
                return p;
            }
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Binary(data)))) => self.buf.extend_from_slice(&data),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(other) => panic!("expected an MQTT packet in a binary frame, got {other:?}"),
                Err(_) => panic!("no whole MQTT packet within {WAIT:?} (have {:?})", self.buf),
            }
        }
    }
}

/// Checks a CONNACK for success (session present 0).
fn assert_connack_ok(level: u8, p: &[u8]) {
    if level == 4 {
        assert_eq!(p, [0x20, 0x02, 0x00, 0x00], "3.1.1 CONNACK accepted");
    } else {
        assert_eq!(p[0], 0x20, "CONNACK: {p:?}");
        let (_, used) = decode_len(&p[1..]).expect("length");
        assert_eq!(
            &p[1 + used..1 + used + 2],
            [0x00, 0x00],
            "5.0 CONNACK success"
        );
    }
}

/// Checks a SUBACK for packet id 1 granting QoS 1.
fn assert_suback_qos1(level: u8, p: &[u8]) {
    if level == 4 {
        assert_eq!(p, [0x90, 0x03, 0x00, 0x01, 0x01], "3.1.1 SUBACK");
    } else {
        assert_eq!(p[0], 0x90, "SUBACK: {p:?}");
        let (_, used) = decode_len(&p[1..]).expect("length");
        let rest = &p[1 + used..];
        assert_eq!(&rest[..2], [0x00, 0x01], "packet id");
        let (props, used) = decode_len(&rest[2..]).expect("property length");
        assert_eq!(&rest[2 + used + props..], [0x01], "5.0 SUBACK grants QoS 1");
    }
}

/// Topic and payload of a QoS 0 PUBLISH.
fn parse_publish_qos0(level: u8, p: &[u8]) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(p[0] & 0xf6, 0x30, "QoS 0 PUBLISH: {p:?}");
    let (_, used) = decode_len(&p[1..]).expect("length");
    let rest = &p[1 + used..];
    let tlen = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    let topic = rest[2..2 + tlen].to_vec();
    let mut rest = &rest[2 + tlen..];
    if level == 5 {
        let (props, used) = decode_len(rest).expect("property length");
        rest = &rest[used + props..];
    }
    (topic, rest.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_raw_split_and_joined_frames() {
    let b = ws_broker().await;
    let addr = ws_addr(&b);
    for level in [4u8, 5] {
        // CONNECT split over three binary frames: the packet type alone, then a cut inside the
        // protocol name, then the rest.
        let mut ws = ws_open(addr).await;
        let mut rd = PacketReader::new();
        let connect = connect_packet(level, &cid("raw-split"), None);
        for part in [&connect[..1], &connect[1..7], &connect[7..]] {
            send_binary(&mut ws, part).await;
        }
        assert_connack_ok(level, &rd.next(&mut ws).await);
        // A SUBSCRIBE split in two frames on the same connection.
        let sub = subscribe_packet(level, &format!("raw/split/{level}"));
        send_binary(&mut ws, &sub[..3]).await;
        send_binary(&mut ws, &sub[3..]).await;
        assert_suback_qos1(level, &rd.next(&mut ws).await);

        // CONNECT as one binary message fragmented over three frames (binary, continuation,
        // continuation) with a ping between the fragments, which is answered at once.
        let mut ws3 = ws_open(addr).await;
        let mut rd3 = PacketReader::new();
        let connect = connect_packet(level, &cid("raw-frag"), None);
        let frames = [
            Frame::message(connect[..3].to_vec(), OpCode::Data(Data::Binary), false),
            Frame::message(connect[3..8].to_vec(), OpCode::Data(Data::Continue), false),
            Frame::message(connect[8..].to_vec(), OpCode::Data(Data::Continue), true),
        ];
        for (i, frame) in frames.into_iter().enumerate() {
            ws3.send(Message::Frame(frame))
                .await
                .expect("send fragment");
            if i == 0 {
                ws3.send(Message::Ping(b"mid".to_vec().into()))
                    .await
                    .expect("send ping");
                match tokio::time::timeout(WAIT, ws3.next()).await {
                    Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(&p[..], b"mid"),
                    other => panic!("expected a pong between fragments, got {other:?}"),
                }
            }
        }
        assert_connack_ok(level, &rd3.next(&mut ws3).await);
        let _ = ws3.close(None).await;

        // A new connection: CONNECT, SUBSCRIBE and PINGREQ joined in one frame.
        let mut ws2 = ws_open(addr).await;
        let mut rd2 = PacketReader::new();
        let topic = format!("raw/joined/{level}");
        let joined = [
            connect_packet(level, &cid("raw-joined"), None),
            subscribe_packet(level, &topic),
            PINGREQ.to_vec(),
        ]
        .concat();
        send_binary(&mut ws2, &joined).await;
        assert_connack_ok(level, &rd2.next(&mut ws2).await);
        assert_suback_qos1(level, &rd2.next(&mut ws2).await);
        assert_eq!(rd2.next(&mut ws2).await, [0xd0, 0x00], "PINGRESP");

        // Both subscriptions are live: a TCP publisher reaches each raw ws client.
        let mut tcp = v3::connect(b.port(), &cid("raw-pub")).await;
        tcp.publish(&topic, rumqttc::QoS::AtMostOnce, false, b"joined")
            .await;
        let (t, payload) = parse_publish_qos0(level, &rd2.next(&mut ws2).await);
        assert_eq!((&t[..], &payload[..]), (topic.as_bytes(), &b"joined"[..]));
        let split_topic = format!("raw/split/{level}");
        tcp.publish(&split_topic, rumqttc::QoS::AtMostOnce, false, b"split")
            .await;
        let (t, payload) = parse_publish_qos0(level, &rd.next(&mut ws).await);
        assert_eq!(
            (&t[..], &payload[..]),
            (split_topic.as_bytes(), &b"split"[..])
        );
        tcp.disconnect().await;
        let _ = ws.close(None).await;
        let _ = ws2.close(None).await;
    }
    b.stop().await;
}

/// Waits for the end of the WebSocket stream (None or an error after the close handshake).
async fn wait_ws_end(ws: &mut Ws) {
    match tokio::time::timeout(WAIT, ws.next()).await {
        Ok(None | Some(Err(_))) => {}
        Ok(Some(Ok(m))) => panic!("unexpected message after close: {m:?}"),
        Err(_) => panic!("connection not closed within {WAIT:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_raw_ping_pong_and_text_frame_closes() {
    let b = ws_broker().await;
    let addr = ws_addr(&b);
    let mut watcher = v3::connect(b.port(), &cid("raw-will-watch")).await;
    watcher
        .subscribe("raw/will/#", rumqttc::QoS::AtMostOnce)
        .await;
    for level in [4u8, 5] {
        let mut ws = ws_open(addr).await;
        let mut rd = PacketReader::new();

        // A ping while the broker is still waiting for CONNECT.
        ws.send(Message::Ping(b"before-connect".to_vec().into()))
            .await
            .expect("send ping");
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(&p[..], b"before-connect"),
            other => panic!("expected a pong before CONNECT, got {other:?}"),
        }

        let will_topic = format!("raw/will/{level}");
        let connect = connect_packet(level, &cid("raw-text"), Some((&will_topic, b"gone")));
        send_binary(&mut ws, &connect).await;
        assert_connack_ok(level, &rd.next(&mut ws).await);

        // A ping on the MQTT connection.
        ws.send(Message::Ping(b"after-connack".to_vec().into()))
            .await
            .expect("send ping");
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Pong(p)))) => assert_eq!(&p[..], b"after-connack"),
            other => panic!("expected a pong after CONNACK, got {other:?}"),
        }
        // MQTT still works after the ping.
        send_binary(&mut ws, &PINGREQ).await;
        assert_eq!(rd.next(&mut ws).await, [0xd0, 0x00], "PINGRESP");

        // A text frame is not MQTT: close 1003, then the connection ends.
        ws.send(Message::text("PINGREQ")).await.expect("send text");
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                assert_eq!(frame.code, CloseCode::Unsupported, "close code 1003")
            }
            other => panic!("expected close 1003 after a text frame, got {other:?}"),
        }
        wait_ws_end(&mut ws).await;

        // The MQTT connection ended abnormally: its will is published.
        let p = watcher.recv_publish().await;
        assert_eq!(p.topic, will_topic);
        assert_eq!(&p.payload[..], b"gone");
    }
    watcher.expect_no_publish(QUIET).await;
    watcher.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

const HS_OK: &str = r#"tern_websocket_handshakes_total{result="ok"}"#;
const HS_FAILED: &str = r#"tern_websocket_handshakes_total{result="failed"}"#;

/// Polls `/metrics` until `series` reads `want` (the counter is bumped by the connection task
/// just after the HTTP response went out); panics with the last value after `WAIT`.
async fn wait_metric(b: &Broker, series: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = b.metric(series).await.unwrap_or(0.0);
        if now == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {now}, expected {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_handshake_metrics() {
    let b = ws_broker().await;
    let addr = ws_addr(&b);
    let ok0 = b.metric(HS_OK).await.expect("ok series exported");
    let failed0 = b.metric(HS_FAILED).await.expect("failed series exported");

    // Three upgrades: rumqttc 3.1.1 and 5.0, and a raw client. A TCP client is not counted.
    let c3 = v3::connect_with(v3_ws_opts(&cid("hs-v3"), &b)).await;
    let c5 = v5::connect_with(v5_ws_opts(&cid("hs-v5"), &b)).await;
    let mut raw = ws_open(addr).await;
    let tcp = v3::connect(b.port(), &cid("hs-tcp")).await;
    wait_metric(&b, HS_OK, ok0 + 3.0).await;
    assert_eq!(b.metric(HS_FAILED).await, Some(failed0));

    // The wrong path: HTTP 404, one failed handshake, no ok one.
    match ws_client(addr, "/not-mqtt").await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 404),
        Err(e) => panic!("expected HTTP 404, got error {e}"),
        Ok(_) => panic!("upgrade on the wrong path was accepted"),
    }
    wait_metric(&b, HS_FAILED, failed0 + 1.0).await;
    assert_eq!(b.metric(HS_OK).await, Some(ok0 + 3.0));

    let _ = raw.close(None).await;
    c3.disconnect().await;
    c5.disconnect().await;
    tcp.disconnect().await;
    b.stop().await;
}
