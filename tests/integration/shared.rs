//! Shared subscriptions (`$share/{ShareName}/{filter}`) with 3.1.1 and 5.0 clients: accepted
//! and invalid share filters, one member per message, several groups beside plain subscribers,
//! delivery QoS, no retained messages, the four strategies (and a per-group override),
//! in-flight credit, member disconnects (QoS 1 moves on, QoS 2 not yet PUBREC'd stays with a
//! persistent session), queuing while every member is away (also across a restart), publisher
//! back-pressure, drops when back-pressure is off, and the per-group metrics.

use crate::common::any::{self, Version};
use crate::common::{cid, v3, v5, Broker, BASE_CONFIG, QUIET, WAIT};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

type Q3 = rumqttc::QoS;
type Q5 = rumqttc::v5::mqttbytes::QoS;

const QUEUE_FULL: (&str, &[(&str, &str)]) =
    ("tern_messages_dropped_total", &[("reason", "queue_full")]);
const MEMBERS: &str = "tern_shared_members";
const QUEUED: &str = "tern_shared_queued_messages";
const DELIVERED: &str = "tern_shared_messages_delivered_total";
const REDELIVERED: &str = "tern_shared_messages_redelivered_total";
const DROPPED: &str = "tern_shared_messages_dropped_total";
const PAUSES: &str = "tern_backpressure_pauses_total";

// ---------------------------------------------------------------- helpers

/// A received PUBLISH, whichever protocol version delivered it.
#[derive(Debug, Clone)]
struct Got {
    topic: String,
    payload: String,
    qos: u8,
    dup: bool,
    raw: Raw,
}

#[derive(Debug, Clone)]
enum Raw {
    V3(rumqttc::Publish),
    V5(rumqttc::v5::mqttbytes::v5::Publish),
}

/// A group member: a 3.1.1 or a 5.0 client, so one group can mix both.
#[allow(clippy::large_enum_variant)] // a handful per test; boxing buys nothing here
enum Member {
    V3(v3::Client),
    V5(v5::Client),
}

impl Member {
    fn id(&self) -> &str {
        match self {
            Member::V3(c) => &c.id,
            Member::V5(c) => &c.id,
        }
    }

    async fn try_next(&mut self, within: Duration) -> Option<Got> {
        match self {
            Member::V3(c) => c.try_recv_publish(within).await.map(|p| Got {
                topic: p.topic.clone(),
                payload: String::from_utf8_lossy(&p.payload).into_owned(),
                qos: p.qos as u8,
                dup: p.dup,
                raw: Raw::V3(p),
            }),
            Member::V5(c) => c.try_recv_publish(within).await.map(|p| Got {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: String::from_utf8_lossy(&p.payload).into_owned(),
                qos: p.qos as u8,
                dup: p.dup,
                raw: Raw::V5(p),
            }),
        }
    }

    async fn next(&mut self) -> Got {
        match self.try_next(WAIT).await {
            Some(g) => g,
            None => panic!("{}: no PUBLISH within {WAIT:?}", self.id()),
        }
    }

    async fn expect_none(&mut self, within: Duration) {
        if let Some(g) = self.try_next(within).await {
            panic!("{}: unexpected PUBLISH {g:?}", self.id());
        }
    }

    /// Acknowledges (PUBACK or PUBREC) a message received with manual acks.
    async fn ack(&self, g: &Got) {
        match (self, &g.raw) {
            (Member::V3(c), Raw::V3(p)) => c.client.ack(p).await.expect("queue ack"),
            (Member::V5(c), Raw::V5(p)) => c.client.ack(p).await.expect("queue ack"),
            _ => panic!("{}: ack for a message of the other protocol", self.id()),
        }
    }

    async fn disconnect(self) {
        match self {
            Member::V3(c) => c.disconnect().await,
            Member::V5(c) => c.disconnect().await,
        }
    }

    async fn kill(self) {
        match self {
            Member::V3(c) => c.kill().await,
            Member::V5(c) => c.kill().await,
        }
    }
}

impl From<any::Client> for Member {
    fn from(c: any::Client) -> Member {
        match c {
            any::Client::V3(c) => Member::V3(c),
            any::Client::V5(c) => Member::V5(c),
        }
    }
}

async fn m3(port: u16, prefix: &str) -> Member {
    Member::V3(v3::connect(port, &cid(prefix)).await)
}

async fn m5(port: u16, prefix: &str) -> Member {
    Member::V5(v5::connect(port, &cid(prefix)).await)
}

/// 3.1.1 options with manual acks (the client sends no PUBACK / PUBREC until told to).
fn v3_manual(id: &str, port: u16, clean: bool) -> rumqttc::MqttOptions {
    let mut o = v3::opts(id, port);
    o.set_clean_session(clean);
    o.set_manual_acks(true);
    o
}

fn v3_persistent(id: &str, port: u16) -> rumqttc::MqttOptions {
    let mut o = v3::opts(id, port);
    o.set_clean_session(false);
    o
}

async fn sub3(c: &mut v3::Client, filter: &str, qos: Q3) {
    assert_eq!(
        c.subscribe(filter, qos).await,
        vec![rumqttc::SubscribeReasonCode::Success(qos)],
        "{}: SUBACK for {filter}",
        c.id
    );
}

async fn sub5(c: &mut v5::Client, filter: &str, qos: Q5) {
    assert_eq!(
        c.subscribe(filter, qos).await,
        vec![rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(
            qos
        )],
        "{}: SUBACK for {filter}",
        c.id
    );
}

/// Subscribes a member at `qos` (0, 1 or 2), expecting that QoS granted.
async fn sub(m: &mut Member, filter: &str, qos: u8) {
    match m {
        Member::V3(c) => sub3(c, filter, q3(qos)).await,
        Member::V5(c) => sub5(c, filter, q5(qos)).await,
    }
}

fn q3(q: u8) -> Q3 {
    match q {
        0 => Q3::AtMostOnce,
        1 => Q3::AtLeastOnce,
        _ => Q3::ExactlyOnce,
    }
}

fn q5(q: u8) -> Q5 {
    match q {
        0 => Q5::AtMostOnce,
        1 => Q5::AtLeastOnce,
        _ => Q5::ExactlyOnce,
    }
}

/// Receives from all `members` until `n` messages arrived in total (bounded); returns each
/// member's messages in arrival order.
async fn collect(members: &mut [Member], n: usize) -> Vec<Vec<Got>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut got: Vec<Vec<Got>> = vec![Vec::new(); members.len()];
    let mut total = 0;
    while total < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {total} of {n} messages arrived; per member: {:?}",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for (i, m) in members.iter_mut().enumerate() {
            while let Some(g) = m.try_next(Duration::from_millis(20)).await {
                got[i].push(g);
                total += 1;
            }
        }
    }
    got
}

/// Asserts that no member receives anything more.
async fn quiet(members: &mut [Member]) {
    for m in members.iter_mut() {
        m.expect_none(QUIET).await;
    }
}

fn payloads(got: &[Got]) -> Vec<String> {
    got.iter().map(|g| g.payload.clone()).collect()
}

/// Every payload of `want` arrived exactly once over all members.
fn assert_each_once(got: &[Vec<Got>], want: &[String]) {
    let mut all: Vec<String> = got.iter().flat_map(|g| payloads(g)).collect();
    all.sort();
    let mut want = want.to_vec();
    want.sort();
    assert_eq!(all, want, "each message to exactly one member");
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

// ---------------------------------------------------------------- metrics

/// One Prometheus text line parsed: (name, labels, value).
fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let mut end = None;
        loop {
            // key
            let mut key = String::new();
            loop {
                let (i, c) = chars.next()?;
                match c {
                    '}' if key.is_empty() => {
                        end = Some(i + 1);
                        break;
                    }
                    '=' => break,
                    ',' | ' ' if key.is_empty() => {}
                    c => key.push(c),
                }
            }
            if end.is_some() {
                break;
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key, value);
            match chars.next()? {
                (_, ',') => {}
                (i, '}') => {
                    end = Some(i + 1);
                    break;
                }
                _ => return None,
            }
        }
        rest = &r[end?..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// Sum of the samples of `name` whose labels include all of `labels`; None when there are none.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for (n, l, v) in text.lines().filter_map(parse_sample) {
        if n == name
            && labels
                .iter()
                .all(|(k, want)| l.get(*k).map(String::as_str) == Some(*want))
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

async fn metric(b: &Broker, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric_sum(&b.metrics_text().await, name, labels)
}

/// A counter's value; a labelled counter that was never touched has no series yet: 0.
async fn counter(b: &Broker, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(b, name, labels).await.unwrap_or(0.0)
}

/// Polls `/metrics` until the series satisfies `ok` (bounded by WAIT).
async fn wait_metric(
    b: &Broker,
    name: &str,
    labels: &[(&str, &str)],
    what: &str,
    ok: impl Fn(Option<f64>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = metric(b, name, labels).await;
        if ok(v) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{name}{labels:?}: expected {what}, observed {v:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_eq(b: &Broker, name: &str, labels: &[(&str, &str)], want: f64) {
    wait_metric(b, name, labels, &format!("{want}"), |v| {
        v.unwrap_or(0.0) == want
    })
    .await;
}

fn group<'a>(name: &'a str, filter: &'a str) -> [(&'a str, &'a str); 2] {
    [("group", name), ("filter", filter)]
}

/// Waits until no client is connected, so a member that just disconnected is detached from
/// its session (the broker closes the socket a moment before it marks the session offline).
async fn wait_none_online(b: &Broker) {
    wait_eq(b, "tern_sessions", &[("state", "online")], 0.0).await;
}

#[test]
fn metric_parser_reads_labels_in_any_order() {
    let text = "# HELP x y\n\
        tern_shared_members{filter=\"a/+\",group=\"g\"} 2\n\
        tern_shared_members{group=\"h\",filter=\"a/+\"} 1\n\
        tern_messages_dropped_total{reason=\"queue_full\"} 3\n\
        tern_backpressure_pauses_total 4\n\
        tern_odd{filter=\"x,\\\"}\",group=\"g\"} 5\n";
    assert_eq!(metric_sum(text, MEMBERS, &group("g", "a/+")), Some(2.0));
    assert_eq!(metric_sum(text, MEMBERS, &[("filter", "a/+")]), Some(3.0));
    assert_eq!(metric_sum(text, QUEUE_FULL.0, QUEUE_FULL.1), Some(3.0));
    assert_eq!(metric_sum(text, PAUSES, &[]), Some(4.0));
    assert_eq!(
        metric_sum(text, "tern_odd", &group("g", "x,\"}")),
        Some(5.0)
    );
    assert_eq!(metric_sum(text, DROPPED, &[]), None);
}

both_versions!(
    shared_subscription_accepted,
    invalid_share_filters_refused,
    each_message_to_exactly_one_member,
    group_queues_while_all_members_offline_first_back_gets_all,
    unsubscribe_leaves_the_group,
);

// ---------------------------------------------------------------- accepted, CONNACK

async fn shared_subscription_accepted(v: Version) {
    let b = Broker::default().await;
    let c = v.connect(b.port(), &v.cid("sh-ok")).await;
    if let any::Client::V5(c) = &c {
        let avail = c
            .connack
            .properties
            .as_ref()
            .and_then(|p| p.shared_subscription_available);
        assert!(
            avail.is_none() || avail == Some(1),
            "Shared Subscription Available must be 1 or absent, got {avail:?}"
        );
    }
    let mut c = Member::from(c);
    for (filter, qos) in [
        ("$share/g/ok/t", 0),
        ("$share/g/ok/+", 1),
        ("$share/other/ok/#", 2),
        ("$share/g/#", 1),
    ] {
        sub(&mut c, filter, qos).await;
    }
    // ok/x matches $share/g/ok/+, $share/other/ok/# and $share/g/#: three groups, each with
    // this client as its only member, so each delivers its own copy.
    let mut p = v.connect(b.port(), &v.cid("sh-ok-pub")).await;
    p.publish("ok/x", 2, false, b"hello").await;
    let mut qos = Vec::new();
    for _ in 0..3 {
        let m = c.next().await;
        assert_eq!(m.payload, "hello");
        assert_eq!(
            m.topic, "ok/x",
            "the published topic, not the $share filter"
        );
        qos.push(m.qos);
    }
    qos.sort();
    assert_eq!(qos, vec![1, 1, 2], "one copy per group, at min(2, granted)");
    c.expect_none(QUIET).await;
    c.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- invalid share filters

const INVALID_SHARES: [&str; 8] = [
    "$share//inv/t",   // empty ShareName
    "$share/g+/inv/t", // '+' in ShareName
    "$share/g#/inv/t", // '#' in ShareName
    "$share/+/inv/t",  // ShareName is '+'
    "$share/#/inv/t",  // ShareName is '#'
    "$share/g",        // no filter
    "$share/g/",       // empty filter
    "$share/#",        // ShareName '#', no filter
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_invalid_share_filters_in_one_subscribe_get_0x80() {
    use rumqttc::{SubscribeFilter, SubscribeReasonCode};
    let b = Broker::default().await;
    let mut c = v3::connect(b.port(), &cid("v3-sh-inv")).await;
    let mut filters: Vec<SubscribeFilter> = INVALID_SHARES
        .iter()
        .map(|f| SubscribeFilter::new(f.to_string(), Q3::AtLeastOnce))
        .collect();
    // One valid filter in the middle: refusing the others must not refuse it.
    filters.insert(
        3,
        SubscribeFilter::new("$share/g/inv/t".into(), Q3::AtLeastOnce),
    );
    c.client.subscribe_many(filters).await.unwrap();
    let codes = c.wait_suback().await;
    let mut want = vec![SubscribeReasonCode::Failure; INVALID_SHARES.len()];
    want.insert(3, SubscribeReasonCode::Success(Q3::AtLeastOnce));
    assert_eq!(
        codes, want,
        "filters: {INVALID_SHARES:?} (valid one at index 3)"
    );

    // The connection stays usable and the valid shared subscription works.
    let mut p = v3::connect(b.port(), &cid("v3-sh-inv-pub")).await;
    p.publish("inv/t", Q3::AtLeastOnce, false, b"ok").await;
    assert_eq!(&c.recv_publish().await.payload[..], b"ok");
    c.expect_no_publish(QUIET).await;
    c.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

/// Each invalid share filter on its own: 3.1.1 has one failure code, 5.0 says 0x8F (and
/// rumqttc then ends the connection, so one connection per filter).
async fn invalid_share_filters_refused(v: Version) {
    let b = Broker::default().await;
    for f in INVALID_SHARES {
        let mut c = v.connect(b.port(), &v.cid("sh-inv")).await;
        assert_eq!(c.subscribe(f, 1).await, vec![v.pick(0x80, 0x8F)], "{f}");
    }
    // The broker is fine afterwards.
    let mut c = v.connect(b.port(), &v.cid("sh-inv-ok")).await;
    assert_eq!(c.subscribe("$share/g/inv/t", 1).await, vec![1]);
    c.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_no_local_on_shared_subscription_is_protocol_error() {
    use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Filter};
    let b = Broker::default().await;
    let mut c = v5::connect(b.port(), &cid("v5-sh-nl")).await;
    let mut f = Filter::new("$share/g/nl/t", Q5::AtLeastOnce);
    f.nolocal = true;
    c.client.subscribe_many([f]).await.unwrap();
    match c.wait_closed(WAIT).await {
        Some(v5::Closed::ServerDisconnect(DisconnectReasonCode::ProtocolError)) => {}
        other => panic!("expected DISCONNECT 0x82 [MQTT-3.8.3-4], got {other:?}"),
    }
    // The subscription was not made: another member of g alone gets every message.
    let mut m = v5::connect(b.port(), &cid("v5-sh-nl-m")).await;
    sub5(&mut m, "$share/g/nl/t", Q5::AtLeastOnce).await;
    let mut p = v5::connect(b.port(), &cid("v5-sh-nl-pub")).await;
    for i in 0..4u8 {
        p.publish("nl/t", Q5::AtLeastOnce, false, &[i]).await;
    }
    for i in 0..4u8 {
        assert_eq!(m.recv_publish().await.payload[..], [i]);
    }
    m.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- one member per message

async fn each_message_to_exactly_one_member(v: Version) {
    let b = Broker::default().await;
    let mut ms = Vec::new();
    for name in ["once-a", "once-b", "once-c"] {
        let mut m = Member::from(v.connect(b.port(), &v.cid(name)).await);
        sub(&mut m, "$share/g/once/+", 2).await;
        ms.push(m);
    }
    let mut p = v.connect(b.port(), &v.cid("once-pub")).await;
    let want = names("m", 30);
    for (i, w) in want.iter().enumerate() {
        let topic = format!("once/{}", i % 5);
        p.publish(&topic, (i % 3) as u8, false, w.as_bytes()).await;
    }
    let got = collect(&mut ms, want.len()).await;
    quiet(&mut ms).await;
    assert_each_once(&got, &want);
    for g in got.iter().flatten() {
        let i: usize = g.payload[1..].parse().unwrap();
        assert_eq!(g.qos as usize, i % 3, "{}: delivered QoS", g.payload);
        assert_eq!(g.topic, format!("once/{}", i % 5));
    }
    for m in ms {
        m.disconnect().await;
    }
    p.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_and_plain_subscribers_each_get_every_message() {
    let b = Broker::default().await;
    // Group g1: 3.1.1 members; group g2: 5.0 members; group mixed: one of each; group g1 on
    // another filter is a different group; plain subscribers of both versions.
    let mut g1 = vec![m3(b.port(), "tg-g1-a").await, m3(b.port(), "tg-g1-b").await];
    let mut g2 = vec![m5(b.port(), "tg-g2-a").await, m5(b.port(), "tg-g2-b").await];
    let mut mixed = vec![m3(b.port(), "tg-mx-a").await, m5(b.port(), "tg-mx-b").await];
    let mut g1_other = vec![m5(b.port(), "tg-g1o").await];
    let mut plain = vec![
        m3(b.port(), "tg-plain3").await,
        m5(b.port(), "tg-plain5").await,
    ];
    for m in g1.iter_mut() {
        sub(m, "$share/g1/tg/t", 1).await;
    }
    for m in g2.iter_mut() {
        sub(m, "$share/g2/tg/t", 1).await;
    }
    for m in mixed.iter_mut() {
        sub(m, "$share/mixed/tg/t", 1).await;
    }
    sub(&mut g1_other[0], "$share/g1/tg/#", 1).await;
    for m in plain.iter_mut() {
        sub(m, "tg/t", 1).await;
    }
    let mut p = v5::connect(b.port(), &cid("tg-pub")).await;
    let want = names("m", 20);
    for w in &want {
        p.publish("tg/t", Q5::AtLeastOnce, false, w.as_bytes())
            .await;
    }
    for (name, ms) in [
        ("g1", &mut g1),
        ("g2", &mut g2),
        ("mixed", &mut mixed),
        ("g1 on tg/#", &mut g1_other),
    ] {
        let got = collect(ms, want.len()).await;
        quiet(ms).await;
        assert_each_once(&got, &want);
        for per in &got {
            let mut sorted = payloads(per);
            sorted.sort_by_key(|s| s[1..].parse::<usize>().unwrap());
            assert_eq!(
                payloads(per),
                sorted,
                "group {name}: one member's share in order"
            );
        }
    }
    for m in plain.iter_mut() {
        let mut got = Vec::new();
        for _ in 0..want.len() {
            got.push(m.next().await.payload);
        }
        assert_eq!(
            got,
            want,
            "{}: a plain subscriber gets every message",
            m.id()
        );
        m.expect_none(QUIET).await;
    }
    for m in g1
        .into_iter()
        .chain(g2)
        .chain(mixed)
        .chain(g1_other)
        .chain(plain)
    {
        m.disconnect().await;
    }
    p.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- QoS and retained

async fn delivery_qos_is_minimum(mk: fn(u16, &'static str) -> MemberFut, label: &str) {
    let b = Broker::default().await;
    // One group per granted QoS, each with a single member.
    let mut ms = Vec::new();
    for q in 0..3u8 {
        let mut m = mk(b.port(), "qmin").await;
        sub(&mut m, &format!("$share/q{q}/qmin/t"), q).await;
        ms.push(m);
    }
    let mut p = v3::connect(b.port(), &cid("qmin-pub")).await;
    for pq in 0..3u8 {
        p.publish("qmin/t", q3(pq), false, format!("p{pq}").as_bytes())
            .await;
    }
    for (sq, m) in ms.iter_mut().enumerate() {
        for pq in 0..3u8 {
            let g = m.next().await;
            assert_eq!(g.payload, format!("p{pq}"), "{label}: order");
            assert_eq!(
                g.qos,
                pq.min(sq as u8),
                "{label}: published at {pq}, subscribed at {sq}"
            );
        }
        m.expect_none(QUIET).await;
    }
    for m in ms {
        m.disconnect().await;
    }
    p.disconnect().await;
    b.stop().await;
}

type MemberFut = std::pin::Pin<Box<dyn std::future::Future<Output = Member> + Send>>;

fn mk3(port: u16, prefix: &'static str) -> MemberFut {
    Box::pin(m3(port, prefix))
}

fn mk5(port: u16, prefix: &'static str) -> MemberFut {
    Box::pin(m5(port, prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_delivery_qos_is_min_of_publish_and_subscription() {
    delivery_qos_is_minimum(mk3, "3.1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_delivery_qos_is_min_of_publish_and_subscription() {
    delivery_qos_is_minimum(mk5, "5.0").await;
}

async fn retained_not_sent_on_shared_subscribe(mk: fn(u16, &'static str) -> MemberFut) {
    let b = Broker::default().await;
    let mut p = v3::connect(b.port(), &cid("ret-pub")).await;
    p.publish("ret/t", Q3::AtLeastOnce, true, b"retained").await;

    let mut plain = mk(b.port(), "ret-plain").await;
    sub(&mut plain, "ret/#", 1).await;
    let g = plain.next().await;
    assert_eq!(g.payload, "retained", "sanity: the retained message exists");

    let mut member = mk(b.port(), "ret-member").await;
    sub(&mut member, "$share/g/ret/#", 1).await;
    member.expect_none(QUIET).await;
    // Subscribing again (replacing the subscription) does not send it either.
    sub(&mut member, "$share/g/ret/#", 1).await;
    member.expect_none(QUIET).await;

    // Live messages are delivered, once.
    p.publish("ret/t", Q3::AtLeastOnce, false, b"live").await;
    assert_eq!(member.next().await.payload, "live");
    member.expect_none(QUIET).await;
    assert_eq!(plain.next().await.payload, "live");
    member.disconnect().await;
    plain.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_retained_not_sent_on_shared_subscribe() {
    retained_not_sent_on_shared_subscribe(mk3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retained_not_sent_on_shared_subscribe() {
    retained_not_sent_on_shared_subscribe(mk5).await;
}

// ---------------------------------------------------------------- strategies

/// N messages over M members, all connected and acking: each gets floor or ceil of N/M.
async fn round_robin_even(extra: &str, mk: fn(u16, &'static str) -> MemberFut, n: usize) {
    let b = Broker::start(extra).await;
    let mut ms = Vec::new();
    for _ in 0..3 {
        let mut m = mk(b.port(), "rr").await;
        sub(&mut m, "$share/g/rr/t", 1).await;
        ms.push(m);
    }
    let mut p = v5::connect(b.port(), &cid("rr-pub")).await;
    let want = names("m", n);
    for w in &want {
        p.publish("rr/t", Q5::AtLeastOnce, false, w.as_bytes())
            .await;
    }
    let got = collect(&mut ms, n).await;
    quiet(&mut ms).await;
    assert_each_once(&got, &want);
    let (lo, hi) = (n / ms.len(), n.div_ceil(ms.len()));
    let counts: Vec<usize> = got.iter().map(Vec::len).collect();
    for c in &counts {
        assert!(
            (lo..=hi).contains(c),
            "round robin: {n} messages over 3 members gave {counts:?}"
        );
    }
    for per in &got {
        let mut sorted = payloads(per);
        sorted.sort_by_key(|s| s[1..].parse::<usize>().unwrap());
        assert_eq!(payloads(per), sorted, "each member's messages in order");
    }
    wait_eq(&b, DELIVERED, &group("g", "rr/t"), n as f64).await;
    for m in ms {
        m.disconnect().await;
    }
    p.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_round_robin_is_the_default_and_even() {
    round_robin_even("", mk3, 31).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_round_robin_configured_and_even() {
    round_robin_even("[shared]\nstrategy = \"round_robin\"\n", mk5, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_strategy_delivers_each_message_once() {
    let b = Broker::start("[shared]\nstrategy = \"random\"\n").await;
    let mut ms = vec![m3(b.port(), "rnd-a").await, m5(b.port(), "rnd-b").await];
    for m in ms.iter_mut() {
        sub(m, "$share/g/rnd/t", 1).await;
    }
    let mut p = v3::connect(b.port(), &cid("rnd-pub")).await;
    let want = names("m", 60);
    for w in &want {
        p.publish("rnd/t", Q3::AtLeastOnce, false, w.as_bytes())
            .await;
    }
    let got = collect(&mut ms, want.len()).await;
    quiet(&mut ms).await;
    assert_each_once(&got, &want);
    // 60 random picks between two members all landing on one: probability 2^-59.
    for (i, per) in got.iter().enumerate() {
        assert!(!per.is_empty(), "member {i} got nothing of 60 random picks");
    }
    for m in ms {
        m.disconnect().await;
    }
    p.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_clientid_per_group_override_keeps_publisher_on_one_member_in_order() {
    // Default round_robin; the group "orders" overrides it.
    let b =
        Broker::start("[shared]\ngroups = [{ name = \"orders\", strategy = \"hash_clientid\" }]\n")
            .await;
    let mut orders = Vec::new();
    let mut spread = Vec::new();
    for _ in 0..3 {
        let mut m = m5(b.port(), "hc-orders").await;
        sub(&mut m, "$share/orders/hc/t", 1).await;
        orders.push(m);
        let mut m = m5(b.port(), "hc-spread").await;
        sub(&mut m, "$share/spread/hc/t", 1).await;
        spread.push(m);
    }
    let mut pubs = Vec::new();
    for _ in 0..3 {
        pubs.push(v3::connect(b.port(), &cid("hc-pub")).await);
    }
    let per_pub = 12;
    for i in 0..per_pub {
        for (k, p) in pubs.iter_mut().enumerate() {
            p.publish(
                "hc/t",
                Q3::AtLeastOnce,
                false,
                format!("p{k}:{i}").as_bytes(),
            )
            .await;
        }
    }
    let total = per_pub * pubs.len();
    let got = collect(&mut orders, total).await;
    quiet(&mut orders).await;
    let mut seen = BTreeSet::new();
    for k in 0..pubs.len() {
        let prefix = format!("p{k}:");
        let holders: Vec<usize> = got
            .iter()
            .enumerate()
            .filter(|(_, per)| per.iter().any(|g| g.payload.starts_with(&prefix)))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            holders.len(),
            1,
            "hash_clientid: publisher {k}'s messages went to members {holders:?}"
        );
        let mine: Vec<String> = payloads(&got[holders[0]])
            .into_iter()
            .filter(|p| p.starts_with(&prefix))
            .collect();
        let want: Vec<String> = (0..per_pub).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(mine, want, "publisher {k}: all of its messages, in order");
        seen.extend(mine);
    }
    assert_eq!(seen.len(), total);

    // The group without an override is round robin: 36 over 3 members, 12 each.
    let got = collect(&mut spread, total).await;
    quiet(&mut spread).await;
    let counts: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(
        counts,
        vec![12, 12, 12],
        "round robin in the group without override"
    );
    for m in orders.into_iter().chain(spread) {
        m.disconnect().await;
    }
    for p in pubs {
        p.disconnect().await;
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_topic_keeps_each_topic_on_one_member_in_order() {
    let b = Broker::start("[shared]\nstrategy = \"hash_topic\"\n").await;
    let mut ms = Vec::new();
    for _ in 0..3 {
        let mut m = m3(b.port(), "ht").await;
        sub(&mut m, "$share/g/ht/#", 2).await;
        ms.push(m);
    }
    // Two publishers: the topic, not the publisher, decides.
    let mut p1 = v5::connect(b.port(), &cid("ht-pub1")).await;
    let mut p2 = v5::connect(b.port(), &cid("ht-pub2")).await;
    let topics = 5;
    let per_topic = 8;
    for i in 0..per_topic {
        for t in 0..topics {
            let p = if (i + t) % 2 == 0 { &mut p1 } else { &mut p2 };
            p.publish(
                &format!("ht/{t}"),
                Q5::AtLeastOnce,
                false,
                format!("{t}:{i}").as_bytes(),
            )
            .await;
        }
    }
    let got = collect(&mut ms, topics * per_topic).await;
    quiet(&mut ms).await;
    for t in 0..topics {
        let topic = format!("ht/{t}");
        let holders: Vec<usize> = got
            .iter()
            .enumerate()
            .filter(|(_, per)| per.iter().any(|g| g.topic == topic))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            holders.len(),
            1,
            "hash_topic: {topic} went to members {holders:?}"
        );
        let mine: Vec<String> = got[holders[0]]
            .iter()
            .filter(|g| g.topic == topic)
            .map(|g| g.payload.clone())
            .collect();
        let want: Vec<String> = (0..per_topic).map(|i| format!("{t}:{i}")).collect();
        assert_eq!(mine, want, "{topic}: all of its messages, in order");
    }
    for m in ms {
        m.disconnect().await;
    }
    p1.disconnect().await;
    p2.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- credit

/// `slow` never acks (window 2), `fast` acks: `slow` holds 2, `fast` gets the rest, nothing
/// waits behind `slow`. Then `fast` leaves and `slow` gets the queue two at a time as it acks.
async fn credit_bounds_unacked_member(b: &Broker, mut slow: Member, fast: Member) {
    let filter = "$share/g/cr/t";
    let labels = group("g", "cr/t");
    sub(&mut slow, filter, 1).await;
    let mut ms = vec![slow, fast];
    sub(&mut ms[1], filter, 1).await;
    wait_eq(b, MEMBERS, &labels, 2.0).await;

    let mut p = v3::connect(b.port(), &cid("cr-pub")).await;
    let want = names("m", 20);
    for w in &want {
        p.publish("cr/t", Q3::AtLeastOnce, false, w.as_bytes())
            .await;
    }
    let got = collect(&mut ms, want.len()).await;
    quiet(&mut ms).await;
    assert_each_once(&got, &want);
    assert_eq!(
        got[0].len(),
        2,
        "the member that does not ack gets exactly its window of 2"
    );
    assert_eq!(got[1].len(), 18, "the acking member gets all the rest");
    wait_eq(b, QUEUED, &labels, 0.0).await;

    // Only the slow member now; it frees its window.
    let fast = ms.pop().unwrap();
    fast.disconnect().await;
    wait_eq(b, MEMBERS, &labels, 1.0).await;
    let mut slow = ms.pop().unwrap();
    for g in &got[0] {
        slow.ack(g).await;
    }
    let more = names("n", 5);
    for w in &more {
        p.publish("cr/t", Q3::AtLeastOnce, false, w.as_bytes())
            .await;
    }
    let mut held = vec![slow.next().await, slow.next().await];
    slow.expect_none(QUIET).await;
    wait_eq(b, QUEUED, &labels, 3.0).await;
    let mut got_more = payloads(&held);
    for _ in 0..3 {
        let first = held.remove(0);
        slow.ack(&first).await;
        let g = slow.next().await;
        got_more.push(g.payload.clone());
        held.push(g);
        // Still only two unacked at a time.
        slow.expect_none(Duration::from_millis(150)).await;
    }
    for g in &held {
        slow.ack(g).await;
    }
    assert_eq!(got_more, more, "the queue drained in order, two at a time");
    slow.expect_none(QUIET).await;
    wait_eq(b, QUEUED, &labels, 0.0).await;
    slow.disconnect().await;
    p.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_credit_is_max_inflight() {
    let b = Broker::start("[limits]\nmax_inflight = 2\n").await;
    let slow = Member::V3(v3::connect_with(v3_manual(&cid("v3-cr-slow"), b.port(), true)).await);
    let fast = m3(b.port(), "v3-cr-fast").await;
    credit_bounds_unacked_member(&b, slow, fast).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_credit_is_client_receive_maximum() {
    // Default max_inflight (1024): the client's Receive Maximum of 2 is the window.
    let b = Broker::default().await;
    let mut o = v5::opts(&cid("v5-cr-slow"), b.port());
    o.set_receive_maximum(Some(2));
    o.set_manual_acks(true);
    let slow = Member::V5(v5::connect_with(o).await);
    let fast = m5(b.port(), "v5-cr-fast").await;
    credit_bounds_unacked_member(&b, slow, fast).await;
    b.stop().await;
}

// ---------------------------------------------------------------- member disconnect

/// `slow` (window 2, never acks) holds 2 messages at `qos`; it drops its connection; `fast`
/// gets those 2 as well, and they are counted as redelivered.
async fn unacked_moves_to_other_member(b: &Broker, mut slow: Member, fast: Member, qos: u8) {
    let labels = group("g", "mv/t");
    sub(&mut slow, "$share/g/mv/t", qos).await;
    let mut ms = vec![slow, fast];
    sub(&mut ms[1], "$share/g/mv/t", qos).await;
    let mut p = v3::connect(b.port(), &cid("mv-pub")).await;
    let want = names("m", 10);
    for w in &want {
        p.publish("mv/t", q3(qos), false, w.as_bytes()).await;
    }
    let got = collect(&mut ms, want.len()).await;
    quiet(&mut ms).await;
    assert_each_once(&got, &want);
    assert_eq!(
        got[0].len(),
        2,
        "the member that does not ack holds its window of 2"
    );
    let held: BTreeSet<String> = payloads(&got[0]).into_iter().collect();

    let mut fast = ms.pop().unwrap();
    ms.pop().unwrap().kill().await;
    let mut moved = BTreeSet::new();
    for _ in 0..2 {
        let g = fast.next().await;
        assert_eq!(g.qos, qos, "{}: redelivered at its QoS", g.payload);
        moved.insert(g.payload);
    }
    assert_eq!(
        moved, held,
        "the unacknowledged messages went to the other member"
    );
    fast.expect_none(QUIET).await;
    wait_eq(b, REDELIVERED, &labels, 2.0).await;
    wait_eq(b, MEMBERS, &labels, 1.0).await;
    fast.disconnect().await;
    p.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_member_disconnect_moves_unacked_qos1() {
    let b = Broker::start("[limits]\nmax_inflight = 2\n").await;
    let slow = Member::V3(v3::connect_with(v3_manual(&cid("v3-mv1-slow"), b.port(), true)).await);
    let fast = m3(b.port(), "v3-mv1-fast").await;
    unacked_moves_to_other_member(&b, slow, fast, 1).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_clean_member_disconnect_moves_qos2_not_pubrecd() {
    let b = Broker::start("[limits]\nmax_inflight = 2\n").await;
    let slow = Member::V3(v3::connect_with(v3_manual(&cid("v3-mv2-slow"), b.port(), true)).await);
    let fast = m3(b.port(), "v3-mv2-fast").await;
    unacked_moves_to_other_member(&b, slow, fast, 2).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_clean_member_disconnect_moves_qos2_not_pubrecd() {
    let b = Broker::default().await;
    let mut o = v5::opts(&cid("v5-mv2-slow"), b.port());
    o.set_receive_maximum(Some(2));
    o.set_manual_acks(true);
    let slow = Member::V5(v5::connect_with(o).await);
    let fast = m5(b.port(), "v5-mv2-fast").await;
    unacked_moves_to_other_member(&b, slow, fast, 2).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_persistent_member_disconnect_moves_unacked_qos1_without_duplicate() {
    let b = Broker::default().await;
    let labels = group("g", "pm/t");
    let slow_id = cid("v5-pm-slow");
    let mut o = v5::persistent_opts(&slow_id, b.port(), 60);
    o.set_receive_maximum(Some(2));
    o.set_manual_acks(true);
    let mut ms = vec![
        Member::V5(v5::connect_with(o).await),
        m5(b.port(), "v5-pm-fast").await,
    ];
    for m in ms.iter_mut() {
        sub(m, "$share/g/pm/t", 1).await;
    }
    let mut p = v5::connect(b.port(), &cid("v5-pm-pub")).await;
    let want = names("m", 6);
    for w in &want {
        p.publish("pm/t", Q5::AtLeastOnce, false, w.as_bytes())
            .await;
    }
    let got = collect(&mut ms, want.len()).await;
    quiet(&mut ms).await;
    assert_each_once(&got, &want);
    assert_eq!(got[0].len(), 2);
    let held: BTreeSet<String> = payloads(&got[0]).into_iter().collect();

    let mut fast = ms.pop().unwrap();
    ms.pop().unwrap().kill().await;
    let mut moved = BTreeSet::new();
    for _ in 0..2 {
        moved.insert(fast.next().await.payload);
    }
    assert_eq!(
        moved, held,
        "QoS 1 moves on even though the session persists"
    );
    wait_eq(&b, REDELIVERED, &labels, 2.0).await;

    // The member comes back: its session is there, but what moved is not sent to it again.
    let back = v5::connect_with(v5::persistent_opts(&slow_id, b.port(), 60)).await;
    assert!(back.connack.session_present);
    let mut ms = vec![Member::V5(back), fast];
    quiet(&mut ms).await;
    // And it is a member again.
    wait_eq(&b, MEMBERS, &labels, 2.0).await;
    let more = names("n", 4);
    for w in &more {
        p.publish("pm/t", Q5::AtLeastOnce, false, w.as_bytes())
            .await;
    }
    let got = collect(&mut ms, more.len()).await;
    quiet(&mut ms).await;
    assert_each_once(&got, &more);
    for m in ms {
        m.disconnect().await;
    }
    p.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_persistent_member_keeps_qos2_not_pubrecd() {
    let b = Broker::default().await;
    let labels = group("g", "q2/t");
    let slow_id = cid("v5-q2-slow");
    let mut o = v5::persistent_opts(&slow_id, b.port(), 60);
    o.set_receive_maximum(Some(2));
    o.set_manual_acks(true);
    let mut ms = vec![
        Member::V5(v5::connect_with(o).await),
        m5(b.port(), "v5-q2-fast").await,
    ];
    for m in ms.iter_mut() {
        sub(m, "$share/g/q2/t", 2).await;
    }
    let mut p = v5::connect(b.port(), &cid("v5-q2-pub")).await;
    let want = names("m", 6);
    for w in &want {
        p.publish("q2/t", Q5::ExactlyOnce, false, w.as_bytes())
            .await;
    }
    let got = collect(&mut ms, want.len()).await;
    quiet(&mut ms).await;
    assert_each_once(&got, &want);
    assert_eq!(got[0].len(), 2);
    let held = payloads(&got[0]);

    let mut fast = ms.pop().unwrap();
    ms.pop().unwrap().kill().await;
    fast.expect_none(Duration::from_secs(1)).await;
    assert_eq!(
        counter(&b, REDELIVERED, &labels).await,
        0.0,
        "QoS 2 not PUBREC'd stays with a persistent session"
    );

    // Back: the two are re-sent to it with DUP, in their order.
    let mut back = Member::V5(v5::connect_with(v5::persistent_opts(&slow_id, b.port(), 60)).await);
    let mut again = Vec::new();
    for _ in 0..2 {
        let g = back.next().await;
        assert!(g.dup, "{}: re-sent with DUP=1", g.payload);
        assert_eq!(g.qos, 2);
        again.push(g.payload);
    }
    assert_eq!(again, held);
    let mut ms = vec![back, fast];
    quiet(&mut ms).await;
    assert_eq!(counter(&b, REDELIVERED, &labels).await, 0.0);
    for m in ms {
        m.disconnect().await;
    }
    p.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- all members away

async fn group_queues_while_all_members_offline_first_back_gets_all(v: Version) {
    let b = Broker::default().await;
    let labels = group("g", "oq/t");
    let ids = [v.cid("sh-oq-a"), v.cid("sh-oq-b")];
    for id in &ids {
        let mut c = v.opts(id, b.port()).persistent().connect().await;
        assert_eq!(c.subscribe("$share/g/oq/t", 2).await, vec![2]);
        c.disconnect().await;
    }
    wait_none_online(&b).await;

    let mut p = v.connect(b.port(), &v.cid("sh-oq-pub")).await;
    // QoS 0 is not queued for a group without a connected member.
    p.publish("oq/t", 0, false, b"qos0").await;
    let want = names("m", 10);
    for (i, w) in want.iter().enumerate() {
        p.publish("oq/t", 1 + (i % 2) as u8, false, w.as_bytes())
            .await;
    }
    wait_eq(&b, QUEUED, &labels, 10.0).await;

    let a = v.opts(&ids[0], b.port()).persistent().connect().await;
    assert!(a.session_present());
    let mut a = Member::from(a);
    for (i, w) in want.iter().enumerate() {
        let g = a.next().await;
        assert_eq!(
            &g.payload, w,
            "the first member back gets the whole queue in order"
        );
        assert_eq!(g.qos, 1 + (i % 2) as u8);
    }
    a.expect_none(QUIET).await;
    wait_eq(&b, QUEUED, &labels, 0.0).await;
    wait_eq(&b, DELIVERED, &labels, 10.0).await;

    let other = v.opts(&ids[1], b.port()).persistent().connect().await;
    assert!(other.session_present());
    let mut ms = vec![a, Member::from(other)];
    quiet(&mut ms).await;

    // Both online: live messages are shared again.
    let more = names("n", 6);
    for w in &more {
        p.publish("oq/t", 1, false, w.as_bytes()).await;
    }
    let got = collect(&mut ms, more.len()).await;
    quiet(&mut ms).await;
    assert_each_once(&got, &more);
    for m in ms {
        m.disconnect().await;
    }
    p.disconnect().await;
    b.stop().await;
}

/// In-process restart on the same data directory (`Running::shutdown`, then `tern::start`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_group_queue_survives_broker_restart() {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tern-it-shared-restart-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!(
        "{BASE_CONFIG}\n[storage]\ndir = {:?}\ndurability = \"os\"\n",
        dir.display().to_string()
    );
    let id = cid("v5-sh-rs");

    let b = Broker::start_raw(&text).await;
    let mut m = v5::connect_with(v5::persistent_opts(&id, b.port(), 300)).await;
    sub5(&mut m, "$share/g/rs/t", Q5::ExactlyOnce).await;
    m.disconnect().await;
    wait_none_online(&b).await;
    let mut p = v5::connect(b.port(), &cid("v5-sh-rs-pub")).await;
    let want = names("m", 6);
    for (i, w) in want.iter().enumerate() {
        p.publish("rs/t", q5(1 + (i % 2) as u8), false, w.as_bytes())
            .await;
    }
    wait_eq(&b, QUEUED, &group("g", "rs/t"), 6.0).await;
    p.disconnect().await;
    b.stop().await;

    let b = Broker::start_raw(&text).await;
    let m = v5::connect_with(v5::persistent_opts(&id, b.port(), 300)).await;
    assert!(m.connack.session_present, "session restored after restart");
    let mut m = Member::V5(m);
    for (i, w) in want.iter().enumerate() {
        let g = m.next().await;
        assert_eq!(&g.payload, w, "queued messages after restart, in order");
        assert_eq!(g.qos, 1 + (i % 2) as u8);
    }
    m.expect_none(QUIET).await;
    // The shared subscription itself survived: live delivery without re-subscribing.
    let mut p = v5::connect(b.port(), &cid("v5-sh-rs-pub2")).await;
    p.publish("rs/t", Q5::AtLeastOnce, false, b"live").await;
    assert_eq!(m.next().await.payload, "live");
    m.expect_none(QUIET).await;
    m.disconnect().await;
    p.disconnect().await;
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `tern` binary as a child process (killed, by its pid, when dropped).
struct Process {
    child: std::process::Child,
    tcp: std::net::SocketAddr,
}

impl Process {
    /// Starts `tern --config FILE` and waits for its "tern: ready tcp=ADDR ..." line.
    fn start(config: &std::path::Path) -> Process {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tern"))
            .arg("--config")
            .arg(config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn tern");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if line.starts_with("tern: ready") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tern did not report ready: {e}");
            }
        };
        let tcp = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("tcp="))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no tcp address in {line:?}"));
        Process { child, tcp }
    }

    /// SIGKILL: a crash, nothing flushed on the way out.
    fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same, across a crash of a real broker process (`kill -9`) with `durability = "os"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_queue_and_inflight_survive_broker_process_crash() {
    let dir = std::env::temp_dir().join(format!(
        "tern-it-shared-crash-{}-{}",
        std::process::id(),
        cid("d")
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tern.toml");
    std::fs::write(
        &config,
        format!(
            "{BASE_CONFIG}\n[storage]\ndir = {:?}\ndurability = \"os\"\n[log]\nlevel = \"warn\"\n",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    let queued_id = cid("crash-q");
    let inflight_id = cid("crash-i");

    let t = Process::start(&config);
    // A persistent member that stays away: the group queues for it.
    let mut c = v5::connect_with(v5::persistent_opts(&queued_id, t.tcp.port(), 300)).await;
    sub5(&mut c, "$share/g/crash/t", Q5::ExactlyOnce).await;
    c.disconnect().await;
    // A persistent member of another group that holds a QoS 2 message without PUBREC.
    let mut o = v5::persistent_opts(&inflight_id, t.tcp.port(), 300);
    o.set_manual_acks(true);
    o.set_receive_maximum(Some(1));
    let mut holder = Member::V5(v5::connect_with(o).await);
    sub(&mut holder, "$share/h/crash/t", 2).await;

    let mut p = v5::connect(t.tcp.port(), &cid("crash-pub")).await;
    let want = names("m", 6);
    for (i, w) in want.iter().enumerate() {
        p.publish("crash/t", q5(2 - (i % 2) as u8), false, w.as_bytes())
            .await;
    }
    let held = holder.next().await;
    assert_eq!((held.payload.as_str(), held.qos), ("m0", 2));
    holder.expect_none(Duration::from_millis(200)).await;
    // Crash with the holder still connected and m0 (QoS 2) not PUBREC'd.
    t.crash();
    drop(p);
    drop(holder);

    let t = Process::start(&config);
    let c = v5::connect_with(v5::persistent_opts(&queued_id, t.tcp.port(), 300)).await;
    assert!(
        c.connack.session_present,
        "session restored after the crash"
    );
    let mut c = Member::V5(c);
    for (i, w) in want.iter().enumerate() {
        let g = c.next().await;
        assert_eq!(&g.payload, w, "group queue after the crash, in order");
        assert_eq!(g.qos, 2 - (i % 2) as u8);
    }
    c.expect_none(QUIET).await;

    // The QoS 2 message the other member had not PUBREC'd is re-sent to it (DUP), then the
    // rest of its group's queue.
    let h = v5::connect_with(v5::persistent_opts(&inflight_id, t.tcp.port(), 300)).await;
    assert!(h.connack.session_present);
    let mut h = Member::V5(h);
    let first = h.next().await;
    assert_eq!(first.payload, "m0");
    assert!(first.dup, "re-sent with DUP=1");
    let mut rest = Vec::new();
    for _ in 1..want.len() {
        rest.push(h.next().await.payload);
    }
    assert_eq!(rest, want[1..].to_vec());
    h.expect_none(QUIET).await;
    c.disconnect().await;
    h.disconnect().await;
    drop(t);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_queued_bytes_bounds_the_group_queue() {
    // Each message is 4 bytes of topic plus 20 of payload: 24 bytes; 100 hold 4 of them.
    let b = Broker::start("[shared]\nmax_queued_bytes = 100\n").await;
    let labels = group("g", "qb/t");
    let id = cid("qb-member");
    let mut c = v3::connect_with(v3_persistent(&id, b.port())).await;
    sub3(&mut c, "$share/g/qb/t", Q3::AtLeastOnce).await;
    c.disconnect().await;
    wait_none_online(&b).await;
    let mut p = v3::connect(b.port(), &cid("qb-pub")).await;
    let want: Vec<String> = (0..10).map(|i| format!("m{i:0>19}")).collect();
    for w in &want {
        assert_eq!(w.len(), 20);
        p.publish("qb/t", Q3::AtLeastOnce, false, w.as_bytes())
            .await;
    }
    wait_metric(&b, DROPPED, &labels, ">= 6", |v| v.unwrap_or(0.0) >= 6.0).await;
    let c = v3::connect_with(v3_persistent(&id, b.port())).await;
    assert!(c.connack.session_present);
    let mut m = Member::V3(c);
    let mut got = Vec::new();
    while let Some(g) = m.try_next(Duration::from_millis(700)).await {
        got.push(g.payload);
        assert!(got.len() <= want.len());
    }
    assert!(
        (3..=4).contains(&got.len()),
        "about 100 bytes of 24-byte messages kept, got {}",
        got.len()
    );
    assert_eq!(
        got,
        want[..got.len()].to_vec(),
        "the oldest are kept, in order"
    );
    wait_eq(&b, DROPPED, &labels, (want.len() - got.len()) as f64).await;
    wait_eq(
        &b,
        QUEUE_FULL.0,
        QUEUE_FULL.1,
        (want.len() - got.len()) as f64,
    )
    .await;
    m.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- back-pressure and drops

/// Counts the PUBACKs a 3.1.1 client receives within `within` (stops early at `max`).
async fn count_pubacks(c: &mut v3::Client, max: usize, within: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + within;
    let mut n = 0;
    while n < max {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c
            .next_where(left, |e| {
                matches!(
                    e,
                    v3::Ev::Pkt(rumqttc::Packet::PubAck(_)) | v3::Ev::Closed(_)
                )
            })
            .await
        {
            Some(v3::Ev::Pkt(_)) => n += 1,
            Some(v3::Ev::Closed(e)) => panic!("{}: publisher closed: {e:?}", c.id),
            None => break,
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_pauses_publisher_instead_of_dropping() {
    let b = Broker::start("[limits]\nmax_inflight = 1\n[shared]\nmax_queued_messages = 8\n").await;
    let labels = group("g", "bp/t");
    let mut o = v5::opts(&cid("bp-member"), b.port());
    o.set_manual_acks(true);
    let mut m = Member::V5(v5::connect_with(o).await);
    sub(&mut m, "$share/g/bp/t", 1).await;

    let mut p = v3::connect(b.port(), &cid("bp-pub")).await;
    let n = 40;
    // Queue all 40 at once (rumqttc's request channel holds 64): the publisher does not wait.
    for i in 0..n {
        p.client
            .publish("bp/t", Q3::AtLeastOnce, false, format!("m{i}").into_bytes())
            .await
            .expect("queue PUBLISH");
    }
    wait_metric(&b, PAUSES, &[], "at least one pause", |v| {
        v.unwrap_or(0.0) >= 1.0
    })
    .await;
    assert_eq!(counter(&b, QUEUE_FULL.0, QUEUE_FULL.1).await, 0.0);
    assert_eq!(counter(&b, DROPPED, &labels).await, 0.0);
    let queued = metric(&b, QUEUED, &labels).await.unwrap_or(0.0);
    assert!(queued <= 8.0, "group queue above its limit: {queued}");
    // Paused, not disconnected: only some PUBACKs so far, and the connection is up.
    let early = count_pubacks(&mut p, n, Duration::from_millis(300)).await;
    assert!(early < n, "publisher was never slowed: {early} PUBACKs");

    // The member acks as it goes: everything arrives, in order, nothing dropped.
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.len() < n {
        if tokio::time::Instant::now() >= deadline {
            let text = b.metrics_text().await;
            let acks = count_pubacks(&mut p, n, Duration::from_millis(300)).await;
            let shown = [
                "shared",
                "pauses",
                "received_total",
                "dropped",
                "sent_total",
            ];
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#') && shown.iter().any(|k| l.contains(k)))
                .collect();
            // Diagnosis: do new bytes from the publisher let the held-back messages through?
            let stalled_at = got.len();
            p.client
                .publish("bp/t", Q3::AtLeastOnce, false, b"poke".to_vec())
                .await
                .expect("queue PUBLISH");
            while let Some(g) = m.try_next(Duration::from_millis(1000)).await {
                m.ack(&g).await;
                got.push(g.payload);
            }
            panic!(
                "stalled: only {stalled_at} of {n} delivered; PUBACKs {early}+{acks}; \
                 after one more PUBLISH from the publisher: {} arrived ({:?}); metrics at the \
                 stall:\n{}",
                got.len() - stalled_at,
                &got[stalled_at..],
                lines.join("\n")
            );
        }
        if let Some(g) = m.try_next(Duration::from_millis(200)).await {
            m.ack(&g).await;
            got.push(g.payload);
        }
    }
    assert_eq!(got, names("m", n), "all delivered in order");
    m.expect_none(QUIET).await;
    let rest = count_pubacks(&mut p, n - early, Duration::from_secs(10)).await;
    assert_eq!(early + rest, n, "every PUBLISH acknowledged");
    assert_eq!(counter(&b, QUEUE_FULL.0, QUEUE_FULL.1).await, 0.0);
    assert_eq!(counter(&b, DROPPED, &labels).await, 0.0);
    wait_eq(&b, QUEUED, &labels, 0.0).await;
    wait_eq(&b, DELIVERED, &labels, n as f64).await;
    m.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_off_drops_and_counts() {
    let b = Broker::start(
        "[limits]\nmax_inflight = 1\n[shared]\nbackpressure = false\nmax_queued_messages = 3\n",
    )
    .await;
    let labels = group("g", "dr/t");
    let mut m = Member::V3(v3::connect_with(v3_manual(&cid("dr-member"), b.port(), true)).await);
    sub(&mut m, "$share/g/dr/t", 1).await;
    let mut p = v3::connect(b.port(), &cid("dr-pub")).await;
    let n = 10;
    // Never paused: each PUBACK comes back (publish waits for it).
    for i in 0..n {
        p.publish("dr/t", Q3::AtLeastOnce, false, format!("m{i}").as_bytes())
            .await;
    }
    let first = m.next().await;
    m.expect_none(QUIET).await;
    // 1 in flight and 3 queued (or 3 in all, when in flight counts): at least 6 dropped.
    wait_metric(&b, DROPPED, &labels, ">= 6", |v| v.unwrap_or(0.0) >= 6.0).await;
    assert_eq!(
        counter(&b, PAUSES, &[]).await,
        0.0,
        "no pause with backpressure off"
    );

    m.ack(&first).await;
    let mut got = vec![first.payload.clone()];
    while let Some(g) = m.try_next(Duration::from_millis(700)).await {
        m.ack(&g).await;
        got.push(g.payload);
        assert!(got.len() <= n);
    }
    let kept = got.len();
    assert!(
        (3..=4).contains(&kept),
        "3 queued (+1 in flight) are kept, got {got:?}"
    );
    wait_eq(&b, DROPPED, &labels, (n - kept) as f64).await;
    wait_eq(&b, QUEUE_FULL.0, QUEUE_FULL.1, (n - kept) as f64).await;
    let idx: Vec<usize> = got.iter().map(|s| s[1..].parse().unwrap()).collect();
    let mut sorted = idx.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(idx, sorted, "kept messages in order, no duplicates");
    m.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_does_not_pause_without_a_connected_member() {
    let b = Broker::start("[shared]\nmax_queued_messages = 4\n").await;
    let labels = group("g", "nc/t");
    let id = cid("nc-member");
    let mut c = v3::connect_with(v3_persistent(&id, b.port())).await;
    sub3(&mut c, "$share/g/nc/t", Q3::AtLeastOnce).await;
    c.disconnect().await;
    wait_none_online(&b).await;

    let mut p = v3::connect(b.port(), &cid("nc-pub")).await;
    // Each publish waits for its PUBACK: a paused publisher would fail here.
    for i in 0..8 {
        p.publish("nc/t", Q3::AtLeastOnce, false, format!("m{i}").as_bytes())
            .await;
    }
    assert_eq!(counter(&b, PAUSES, &[]).await, 0.0);
    wait_eq(&b, DROPPED, &labels, 4.0).await;
    wait_eq(&b, QUEUE_FULL.0, QUEUE_FULL.1, 4.0).await;
    assert_eq!(metric(&b, QUEUED, &labels).await, Some(4.0));

    let c = v3::connect_with(v3_persistent(&id, b.port())).await;
    assert!(c.connack.session_present);
    let mut m = Member::V3(c);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(m.next().await.payload);
    }
    assert_eq!(
        got,
        names("m", 4),
        "the first 4 are kept, newer ones dropped"
    );
    m.expect_none(QUIET).await;
    m.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

// ---------------------------------------------------------------- unsubscribe and metrics

async fn unsubscribe_leaves_the_group(v: Version) {
    let b = Broker::default().await;
    let labels = group("g", "us/+");
    let mut a = v.connect(b.port(), &v.cid("us-a")).await;
    let mut rest = v.connect(b.port(), &v.cid("us-b")).await;
    for c in [&mut a, &mut rest] {
        assert_eq!(c.subscribe("$share/g/us/+", 1).await, vec![1]);
    }
    wait_eq(&b, MEMBERS, &labels, 2.0).await;
    // A 3.1.1 UNSUBACK carries no reason codes; 5.0 says Success.
    assert_eq!(
        a.unsubscribe("$share/g/us/+").await,
        v.pick(vec![], vec![0x00])
    );
    wait_eq(&b, MEMBERS, &labels, 1.0).await;
    let mut p = v.connect(b.port(), &v.cid("us-pub")).await;
    let want = names("m", 6);
    for w in &want {
        p.publish("us/t", 1, false, w.as_bytes()).await;
    }
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let m = rest.recv_publish().await;
        got.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    assert_eq!(got, want, "the remaining member gets everything");
    a.expect_no_publish(QUIET).await;
    rest.expect_no_publish(QUIET).await;
    // The last member leaving ends the group: its series go away.
    rest.unsubscribe("$share/g/us/+").await;
    wait_metric(&b, MEMBERS, &labels, "no series (group ended)", |v| {
        v.is_none()
    })
    .await;
    a.disconnect().await;
    rest.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_metrics_per_group_and_filter() {
    let b = Broker::default().await;
    let g = group("g", "mt/+");
    let h = group("h", "mt/+");
    let g_other = group("g", "mt/#");
    let mut gs = vec![m5(b.port(), "mt-g-a").await, m3(b.port(), "mt-g-b").await];
    for m in gs.iter_mut() {
        sub(m, "$share/g/mt/+", 1).await;
    }
    let mut hs = vec![m5(b.port(), "mt-h").await];
    sub(&mut hs[0], "$share/h/mt/+", 1).await;
    let mut os = vec![m3(b.port(), "mt-g-other").await];
    sub(&mut os[0], "$share/g/mt/#", 1).await;

    wait_eq(&b, MEMBERS, &g, 2.0).await;
    wait_eq(&b, MEMBERS, &h, 1.0).await;
    wait_eq(&b, MEMBERS, &g_other, 1.0).await;

    let mut p = v5::connect(b.port(), &cid("mt-pub")).await;
    let want = names("m", 6);
    for w in &want {
        p.publish("mt/x", Q5::AtLeastOnce, false, w.as_bytes())
            .await;
    }
    for ms in [&mut gs, &mut hs, &mut os] {
        let got = collect(ms, want.len()).await;
        quiet(ms).await;
        assert_each_once(&got, &want);
    }
    // Only under mt/#.
    p.publish("mt/x/y", Q5::AtLeastOnce, false, b"deep").await;
    assert_eq!(os[0].next().await.payload, "deep");

    for labels in [&g, &h] {
        wait_eq(&b, DELIVERED, labels, 6.0).await;
        wait_eq(&b, QUEUED, labels, 0.0).await;
        assert_eq!(counter(&b, REDELIVERED, labels).await, 0.0);
        assert_eq!(counter(&b, DROPPED, labels).await, 0.0);
    }
    wait_eq(&b, DELIVERED, &g_other, 7.0).await;
    let text = b.metrics_text().await;
    // (Counter families without any sample yet are not exposed at all, so only these.)
    for (name, kind) in [
        (MEMBERS, "gauge"),
        (QUEUED, "gauge"),
        (DELIVERED, "counter"),
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# TYPE {name} {kind}"))),
            "{name} is a {kind}"
        );
    }

    // A member leaving lowers the gauge.
    gs.pop().unwrap().disconnect().await;
    wait_eq(&b, MEMBERS, &g, 1.0).await;
    for m in gs.into_iter().chain(hs).chain(os) {
        m.disconnect().await;
    }
    p.disconnect().await;
    b.stop().await;
}

/// With `mqtt.reserve_response_topics`, another client's reply topic (`mqtt.response_prefix`)
/// reaches only that client, also through a shared subscription: a group on `reply/#` gets
/// the messages of its own member's reply topic, not those of anyone else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_topics_reach_only_their_owner_through_a_group() {
    let b = Broker::start("[mqtt]\nreserve_response_topics = true\n").await;
    let mut member = v3::connect(b.port(), &cid("sh-reply-m")).await;
    sub3(&mut member, "$share/g/reply/#", Q3::AtLeastOnce).await;
    let own = format!("reply/{}/x", member.id);
    let mut p = v3::connect(b.port(), &cid("sh-reply-p")).await;
    let before = b
        .metric("tern_messages_dropped_total{reason=\"not_authorized\"}")
        .await
        .unwrap_or(0.0);
    p.publish("reply/somebody-else/x", Q3::AtLeastOnce, false, b"theirs")
        .await;
    p.publish(&own, Q3::AtLeastOnce, false, b"mine").await;
    let got = member.recv_publish().await;
    assert_eq!(&got.payload[..], b"mine");
    member.expect_no_publish(QUIET).await;
    let after = b
        .metric("tern_messages_dropped_total{reason=\"not_authorized\"}")
        .await
        .unwrap_or(0.0);
    assert_eq!(after - before, 1.0, "the other client's reply was refused");
    member.disconnect().await;
    p.disconnect().await;
    b.stop().await;
}
