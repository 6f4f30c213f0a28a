//! Operating the broker (issue 7) in-process with rumqttc: `/health`, `/ready` and unknown
//! paths, the names in the exposition, counters that move by exactly the traffic (3.1.1 QoS 1
//! fan-out, 5.0 QoS 2 handshakes, publishes nobody subscribed to), the queued / in-flight
//! gauges, and `$SYS` topics (retained, not matched by `#`). Reload, logs and signals are
//! tested against the binary in tests/python/test_operations.py.

use crate::common::{cid, v3, v5, Broker, QUIET, WAIT};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RECV_TYPES: [&str; 11] = [
    "connect",
    "publish",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "subscribe",
    "unsubscribe",
    "pingreq",
    "disconnect",
    "auth",
];
const SENT_TYPES: [&str; 11] = [
    "connack",
    "publish",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "suback",
    "unsuback",
    "pingresp",
    "disconnect",
    "auth",
];

/// `GET path` on the metrics listener: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    tokio::time::timeout(WAIT, async move {
        let mut s = TcpStream::connect(addr).await.expect("connect to metrics");
        s.write_all(req.as_bytes()).await.expect("send request");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read response");
        let text = String::from_utf8(buf).expect("utf-8 response");
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    })
    .await
    .expect("metrics listener answered in time")
}

/// The value of the sample whose name and labels are exactly `series`.
fn value(text: &str, series: &str) -> Option<f64> {
    crate::common::metric_value(text, series)
}

fn packets(dir: &str, ty: &str) -> String {
    format!("tern_packets_{dir}_total{{type=\"{ty}\"}}")
}

fn qos(name: &str, q: u8) -> String {
    format!("{name}{{qos=\"{q}\"}}")
}

/// Expected changes of both packet counters: the given counts, 0 for every other type.
fn packet_deltas(recv: &[(&str, f64)], sent: &[(&str, f64)]) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for t in RECV_TYPES {
        let n = recv.iter().find(|(k, _)| *k == t).map_or(0.0, |(_, n)| *n);
        out.push((packets("received", t), n));
    }
    for t in SENT_TYPES {
        let n = sent.iter().find(|(k, _)| *k == t).map_or(0.0, |(_, n)| *n);
        out.push((packets("sent", t), n));
    }
    for (k, _) in recv {
        assert!(RECV_TYPES.contains(k), "unknown received type {k}");
    }
    for (k, _) in sent {
        assert!(SENT_TYPES.contains(k), "unknown sent type {k}");
    }
    out
}

/// Polls `/metrics` until every series has changed by exactly its delta since `base` (or,
/// with `base` = None, has exactly that value). Panics with every mismatch after WAIT.
async fn wait_series(b: &Broker, base: Option<&str>, want: &[(String, f64)]) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = b.metrics_text().await;
        let mut bad = Vec::new();
        for (series, delta) in want {
            let now = value(&text, series);
            let got = match (now, base) {
                (Some(v), Some(base)) => value(base, series).map(|b0| v - b0),
                (v, None) => v,
                (None, _) => None,
            };
            if got != Some(*delta) {
                bad.push(format!("  {series}: expected {delta}, got {got:?}"));
            }
        }
        if bad.is_empty() {
            return text;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "metrics never matched{}:\n{}",
                if base.is_some() { " (changes)" } else { "" },
                bad.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn s(series: &str, v: f64) -> (String, f64) {
    (series.to_string(), v)
}

// ---------------------------------------------------------------- endpoints and names

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_unknown_paths() {
    let b = Broker::default().await;
    let (status, body) = http_get(b.metrics, "/health").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = http_get(b.metrics, "/ready").await;
    assert_eq!(status, 200, "/ready: {body}");
    assert_eq!(http_get(b.metrics, "/nothing-here").await.0, 404);
    assert_eq!(http_get(b.metrics, "/metrics/extra").await.0, 404);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_names_build_info_and_uptime() {
    let b = Broker::default().await;
    let marker = cid("opsmarker");
    let c = v3::connect(b.port(), &marker).await;
    let text = b.metrics_text().await;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let mut types = BTreeMap::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, ty) = (it.next().unwrap(), it.next().unwrap());
            types.insert(name.to_string(), ty.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or("");
        assert!(
            name.starts_with("tern_") || name.starts_with("process_"),
            "series {line:?}"
        );
        assert!(
            !line.contains(&marker),
            "a label carries a client id: {line}"
        );
    }
    for (name, ty) in &types {
        if ty == "counter" {
            assert!(name.ends_with("_total"), "counter {name} without _total");
        }
    }
    for (name, ty) in [
        ("tern_packets_received_total", "counter"),
        ("tern_packets_sent_total", "counter"),
        ("tern_auth_failures_total", "counter"),
        ("tern_queued_messages", "gauge"),
        ("tern_inflight_messages", "gauge"),
        ("tern_sessions_by_queue_depth", "gauge"),
        ("tern_build_info", "gauge"),
        ("tern_storage_commit_seconds", "histogram"),
        ("tern_storage_batch_submits", "histogram"),
        ("process_cpu_seconds_total", "counter"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(ty), "{name}");
    }
    assert!(types.contains_key("tern_uptime_seconds"), "{types:?}");
    assert_eq!(
        value(&text, "tern_build_info{version=\"0.1.0\"}"),
        Some(1.0)
    );
    assert!(value(&text, "tern_uptime_seconds").is_some_and(|v| v >= 0.0));
    assert_eq!(value(&text, "tern_connections_open"), Some(1.0));
    for le in ["0", "10", "100", "1000", "10000", "+Inf"] {
        let series = format!("tern_sessions_by_queue_depth{{at_most=\"{le}\"}}");
        // One online session with an empty queue: in every bucket.
        assert_eq!(value(&text, &series), Some(1.0), "{series}");
    }
    c.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- counters

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_qos1_fan_out_moves_counters_exactly() {
    use rumqttc::QoS;
    let b = Broker::default().await;
    let mut subs = Vec::new();
    for i in 0..2 {
        let mut c = v3::connect(b.port(), &cid(&format!("ops-sub{i}"))).await;
        c.subscribe("ops/fan", QoS::AtLeastOnce).await;
        subs.push(c);
    }
    let mut p = v3::connect(b.port(), &cid("ops-pub")).await;
    let base = b.metrics_text().await;
    for i in 0..10 {
        p.publish(
            "ops/fan",
            QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    for c in &mut subs {
        for i in 0..10 {
            let m = c.recv_publish().await;
            assert_eq!(&m.payload[..], format!("m{i}").as_bytes());
        }
    }
    p.publish("ops/nobody", QoS::AtMostOnce, false, b"lost")
        .await;
    let mut want = packet_deltas(
        &[("publish", 11.0), ("puback", 20.0)],
        &[("puback", 10.0), ("publish", 20.0)],
    );
    want.extend([
        s(&qos("tern_messages_received_total", 0), 1.0),
        s(&qos("tern_messages_received_total", 1), 10.0),
        s(&qos("tern_messages_received_total", 2), 0.0),
        s(&qos("tern_messages_sent_total", 0), 0.0),
        s(&qos("tern_messages_sent_total", 1), 20.0),
        s(&qos("tern_messages_sent_total", 2), 0.0),
        s(
            "tern_messages_dropped_total{reason=\"no_subscribers\"}",
            1.0,
        ),
        s("tern_messages_dropped_total{reason=\"queue_full\"}", 0.0),
        s("tern_connections_open", 0.0),
    ]);
    wait_series(&b, Some(&base), &want).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_qos2_handshakes_move_counters_exactly() {
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::default().await;
    let base = b.metrics_text().await;
    let mut sub = v5::connect(b.port(), &cid("ops5-sub")).await;
    sub.subscribe("ops/two", QoS::ExactlyOnce).await;
    let mut p = v5::connect(b.port(), &cid("ops5-pub")).await;
    for i in 0..5 {
        p.publish(
            "ops/two",
            QoS::ExactlyOnce,
            false,
            format!("q{i}").as_bytes(),
        )
        .await;
    }
    for i in 0..5 {
        let m = sub.recv_publish().await;
        assert_eq!(&m.payload[..], format!("q{i}").as_bytes());
        assert_eq!(m.qos, QoS::ExactlyOnce);
    }
    p.disconnect().await;
    sub.disconnect().await;
    let mut want = packet_deltas(
        &[
            ("connect", 2.0),
            ("subscribe", 1.0),
            ("publish", 5.0),
            ("pubrel", 5.0),
            ("pubrec", 5.0),
            ("pubcomp", 5.0),
            ("disconnect", 2.0),
        ],
        &[
            ("connack", 2.0),
            ("suback", 1.0),
            ("pubrec", 5.0),
            ("pubcomp", 5.0),
            ("publish", 5.0),
            ("pubrel", 5.0),
        ],
    );
    want.extend([
        s(&qos("tern_messages_received_total", 2), 5.0),
        s(&qos("tern_messages_sent_total", 2), 5.0),
        s(&qos("tern_messages_received_total", 1), 0.0),
        s(&qos("tern_messages_sent_total", 1), 0.0),
        s("tern_connections_accepted_total", 2.0),
        s("tern_connections_open", 0.0),
        s("tern_auth_failures_total", 0.0),
    ]);
    wait_series(&b, Some(&base), &want).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_inflight_and_queued_gauges_follow_receive_maximum() {
    use rumqttc::v5::mqttbytes::QoS;
    let b = Broker::default().await;
    let mut o = v5::opts(&cid("ops5-slow"), b.port());
    o.set_manual_acks(true);
    o.set_receive_maximum(Some(2));
    let mut sub = v5::connect_with(o).await;
    sub.subscribe("ops/slow", QoS::AtLeastOnce).await;
    let mut p = v5::connect(b.port(), &cid("ops5-fast")).await;
    for i in 0..5 {
        p.publish(
            "ops/slow",
            QoS::AtLeastOnce,
            false,
            format!("s{i}").as_bytes(),
        )
        .await;
    }
    p.disconnect().await;
    let first = sub.recv_publish().await;
    let second = sub.recv_publish().await;
    assert_eq!(&first.payload[..], b"s0");
    assert_eq!(&second.payload[..], b"s1");
    sub.expect_no_publish(QUIET).await;
    let depth = |le: &str, n: f64| {
        s(
            &format!("tern_sessions_by_queue_depth{{at_most=\"{le}\"}}"),
            n,
        )
    };
    wait_series(
        &b,
        None,
        &[
            s("tern_inflight_messages", 2.0),
            s("tern_queued_messages", 3.0),
            depth("0", 0.0),
            depth("10", 1.0),
            depth("+Inf", 1.0),
        ],
    )
    .await;

    sub.client.ack(&first).await.expect("ack");
    let third = sub.recv_publish().await;
    assert_eq!(&third.payload[..], b"s2");
    wait_series(
        &b,
        None,
        &[
            s("tern_inflight_messages", 2.0),
            s("tern_queued_messages", 2.0),
        ],
    )
    .await;
    let mut pending = vec![second, third];
    let mut seen = 3;
    while let Some(m) = pending.pop() {
        sub.client.ack(&m).await.expect("ack");
        if seen < 5 {
            pending.push(sub.recv_publish().await);
            seen += 1;
        }
    }
    wait_series(
        &b,
        None,
        &[
            s("tern_inflight_messages", 0.0),
            s("tern_queued_messages", 0.0),
            depth("0", 1.0),
        ],
    )
    .await;
    sub.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- $SYS

const SYS_INTERVAL_1: &str = "[sys_topics]\ninterval = 1\n";

fn check_sys(topic: &str, payload: &str) {
    match topic {
        "$SYS/broker/version" => assert_eq!(payload, "tern version 0.1.0"),
        "$SYS/broker/uptime" => {
            let n = payload.strip_suffix(" seconds").expect("N seconds");
            assert!(n.parse::<u64>().is_ok(), "{topic}: {payload:?}");
        }
        t if t.starts_with("$SYS/broker/load/") => {
            assert!(payload.parse::<f64>().is_ok(), "{topic}: {payload:?}")
        }
        "$SYS/broker/clients/connected"
        | "$SYS/broker/clients/total"
        | "$SYS/broker/messages/received"
        | "$SYS/broker/bytes/sent"
        | "$SYS/broker/subscriptions/count"
        | "$SYS/broker/retained messages/count" => {
            assert!(payload.parse::<u64>().is_ok(), "{topic}: {payload:?}")
        }
        _ => {}
    }
}

const SYS_SOME: [&str; 7] = [
    "$SYS/broker/version",
    "$SYS/broker/uptime",
    "$SYS/broker/clients/connected",
    "$SYS/broker/messages/received",
    "$SYS/broker/subscriptions/count",
    "$SYS/broker/retained messages/count",
    "$SYS/broker/load/connections/1min",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_reach_v311_and_v5_subscribers_retained() {
    let b = Broker::start(SYS_INTERVAL_1).await;

    let mut c3 = v3::connect(b.port(), &cid("ops-sys3")).await;
    c3.subscribe("$SYS/#", rumqttc::QoS::AtMostOnce).await;
    let mut seen = BTreeMap::new();
    while !SYS_SOME.iter().all(|t| seen.contains_key(*t)) {
        let m = c3.recv_publish().await;
        let payload = String::from_utf8(m.payload.to_vec()).expect("utf-8 payload");
        check_sys(&m.topic, &payload);
        if m.retain {
            seen.insert(m.topic.clone(), payload);
        }
    }

    use rumqttc::v5::mqttbytes::QoS;
    let mut c5 = v5::connect(b.port(), &cid("ops-sys5")).await;
    c5.subscribe("$SYS/#", QoS::AtLeastOnce).await;
    let mut seen = BTreeMap::new();
    while !SYS_SOME.iter().all(|t| seen.contains_key(*t)) {
        let m = c5.recv_publish().await;
        let topic = String::from_utf8(m.topic.to_vec()).expect("utf-8 topic");
        let payload = String::from_utf8(m.payload.to_vec()).expect("utf-8 payload");
        assert_eq!(m.qos, QoS::AtMostOnce, "{topic}");
        check_sys(&topic, &payload);
        if m.retain {
            seen.insert(topic, payload);
        }
    }
    // Both subscribers are connected: a later publication says so.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "clients/connected never said 2"
        );
        let m = c5.recv_publish().await;
        if &m.topic[..] == b"$SYS/broker/clients/connected" && &m.payload[..] == b"2" {
            break;
        }
    }
    c3.disconnect().await;
    c5.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_does_not_match_sys_topics() {
    use rumqttc::QoS;
    let b = Broker::start(SYS_INTERVAL_1).await;
    let mut c = v3::connect(b.port(), &cid("ops-all")).await;
    c.subscribe("#", QoS::AtMostOnce).await;
    let mut p = v3::connect(b.port(), &cid("ops-allpub")).await;
    p.publish("ops/normal", QoS::AtLeastOnce, false, b"seen")
        .await;
    let m = c.recv_publish().await;
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("ops/normal", &b"seen"[..])
    );
    // Two intervals: neither the retained set nor a periodic publication may arrive.
    c.expect_no_publish(Duration::from_millis(1600)).await;
    p.disconnect().await;
    c.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_interval_zero_publishes_nothing() {
    use rumqttc::QoS;
    let b = Broker::start("[sys_topics]\ninterval = 0\n").await;
    let mut c = v3::connect(b.port(), &cid("ops-nosys")).await;
    c.subscribe("$SYS/#", QoS::AtMostOnce).await;
    c.expect_no_publish(Duration::from_millis(1500)).await;
    c.disconnect().await;
    b.stop().await;
}
