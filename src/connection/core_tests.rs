//! Unit tests of the connection core: real broker, real packet handlers, no sockets and no
//! real time. A test client writes packets with `mqttbytes` (an independent codec), hands the
//! bytes to [`Client::handle_input`] with a time of its choosing, and reads back what
//! [`Client::poll_output`] wrote. Commits are completed by hand through [`SimStore`], so
//! "acknowledged only after the commit" is observable step by step.

use super::client::Client;
use super::connect::accept;
use super::Close;
use crate::broker::{recovery, Broker};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::{decode_packet, DecodeOutcome};
use crate::session::registry::Kick;
use crate::storage::sim::SimStore;
use crate::storage::{MemoryStore, Store};
use bytes::BytesMut;
use mqttbytes::{v4, v5, QoS};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

struct Harness {
    broker: Arc<Broker>,
    store: Option<Arc<SimStore>>,
    dir: Option<std::path::PathBuf>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn config() -> Config {
    let mut c = Config::default();
    c.auth.allow_anonymous = true;
    c.limits.receive_maximum = 3;
    c
}

fn harness(durable: bool, config: Config) -> Harness {
    let metrics = Metrics::new().expect("metrics");
    let auth = crate::auth::Authorizer::load("", &config.auth).expect("auth");
    if durable {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tern-core-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (store, recovered) = SimStore::open(&dir).expect("store");
        let store = Arc::new(store);
        let dyn_store: Arc<dyn Store> = store.clone();
        let broker = Arc::new(Broker::new(config, metrics, dyn_store, auth));
        recovery::restore(&broker, recovered);
        Harness {
            broker,
            store: Some(store),
            dir: Some(dir),
        }
    } else {
        let broker = Arc::new(Broker::new(config, metrics, Arc::new(MemoryStore), auth));
        Harness {
            broker,
            store: None,
            dir: None,
        }
    }
}

/// One simulated connection: the core, its buffers, and what the client has read.
struct Conn {
    client: Client,
    rbuf: BytesMut,
    wbuf: BytesMut,
    v5: bool,
    _kick: oneshot::Receiver<Kick>,
}

fn connect_bytes(id: &str, v5: bool, clean: bool, keep_alive: u16, will: bool) -> BytesMut {
    let mut buf = BytesMut::new();
    if v5 {
        let mut c = v5::Connect::new(id);
        c.clean_session = clean;
        c.keep_alive = keep_alive;
        c.properties = Some(crate::protocol::test_support::v5_connect_properties(
            Some(if clean { 0 } else { 600 }),
            None,
        ));
        if will {
            c.last_will = Some(v5::LastWill::new("will/t", "gone", QoS::AtLeastOnce, false));
        }
        c.write(&mut buf).expect("connect");
    } else {
        let mut c = v4::Connect::new(id);
        c.clean_session = clean;
        c.keep_alive = keep_alive;
        if will {
            c.last_will = Some(v4::LastWill::new("will/t", "gone", QoS::AtLeastOnce, false));
        }
        c.write(&mut buf).expect("connect");
    }
    buf
}

impl Harness {
    async fn connect(&self, id: &str, v5: bool, clean: bool, keep_alive: u16, will: bool) -> Conn {
        let mut bytes = connect_bytes(id, v5, clean, keep_alive, will);
        let Ok(DecodeOutcome::Packet(packet, _)) = decode_packet(&mut bytes, None, 1 << 20) else {
            panic!("CONNECT does not decode")
        };
        let (kick_tx, kick_rx) = oneshot::channel();
        let mut wbuf = BytesMut::new();
        let client = accept(
            &self.broker,
            &mut wbuf,
            packet,
            super::Origin {
                peer: "127.0.0.1:1".parse().expect("addr"),
                listener: "tcp",
            },
            kick_tx,
            None,
            Arc::new(crate::connection::Entry::plain(
                &self.broker.config,
                self.broker.limits(),
            )),
        )
        .await
        .expect("accepted");
        Conn {
            client,
            rbuf: BytesMut::new(),
            wbuf,
            v5,
            _kick: kick_rx,
        }
    }

    fn complete_commits(&self) {
        if let Some(s) = &self.store {
            s.complete(usize::MAX);
        }
    }
}

/// What the client read, as (packet type nibble, packet id or reason, payload).
#[derive(Debug, PartialEq)]
enum Got {
    ConnAck(bool),
    SubAck,
    Publish(String, u16, Vec<u8>),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Disconnect(u8),
    Other,
}

impl Conn {
    fn send(&mut self, now: Instant, write: impl FnOnce(&mut BytesMut, bool)) -> Result<(), Close> {
        let mut b = BytesMut::new();
        write(&mut b, self.v5);
        self.rbuf.extend_from_slice(&b);
        self.client
            .handle_input(now, &mut self.rbuf, &mut self.wbuf)
    }

    /// Polls the core and returns the packets it let out.
    fn output(&mut self, now: Instant) -> Result<Vec<Got>, Close> {
        self.client.poll_output(now, &mut self.wbuf, 1 << 20)?;
        let n = self.client.writable(self.wbuf.len());
        let mut out = self.wbuf.split_to(n);
        self.client.handle_written(now, n);
        let mut got = Vec::new();
        while !out.is_empty() {
            let p = if self.v5 {
                match v5::read(&mut out, 1 << 20).expect("broker output decodes") {
                    v5::Packet::ConnAck(c) => Got::ConnAck(c.session_present),
                    v5::Packet::SubAck(_) => Got::SubAck,
                    v5::Packet::Publish(p) => Got::Publish(p.topic, p.pkid, p.payload.to_vec()),
                    v5::Packet::PubAck(a) => Got::PubAck(a.pkid),
                    v5::Packet::PubRec(a) => Got::PubRec(a.pkid),
                    v5::Packet::PubRel(a) => Got::PubRel(a.pkid),
                    v5::Packet::PubComp(a) => Got::PubComp(a.pkid),
                    v5::Packet::Disconnect(d) => Got::Disconnect(d.reason_code as u8),
                    _ => Got::Other,
                }
            } else {
                match v4::read(&mut out, 1 << 20).expect("broker output decodes") {
                    v4::Packet::ConnAck(c) => Got::ConnAck(c.session_present),
                    v4::Packet::SubAck(_) => Got::SubAck,
                    v4::Packet::Publish(p) => Got::Publish(p.topic, p.pkid, p.payload.to_vec()),
                    v4::Packet::PubAck(a) => Got::PubAck(a.pkid),
                    v4::Packet::PubRec(a) => Got::PubRec(a.pkid),
                    v4::Packet::PubRel(a) => Got::PubRel(a.pkid),
                    v4::Packet::PubComp(a) => Got::PubComp(a.pkid),
                    _ => Got::Other,
                }
            };
            got.push(p);
        }
        Ok(got)
    }
}

fn publish(topic: &str, qos: QoS, pid: u16, payload: &str) -> impl FnOnce(&mut BytesMut, bool) {
    let (topic, payload) = (topic.to_string(), payload.to_string());
    move |b, v5| {
        if v5 {
            let mut p = v5::Publish::new(topic, qos, payload);
            p.pkid = pid;
            p.write(b).expect("publish");
        } else {
            let mut p = v4::Publish::new(topic, qos, payload);
            p.pkid = pid;
            p.write(b).expect("publish");
        }
    }
}

fn subscribe(filter: &str, qos: QoS) -> impl FnOnce(&mut BytesMut, bool) {
    let filter = filter.to_string();
    move |b, v5| {
        if v5 {
            let mut s = v5::Subscribe::new(filter, qos);
            s.pkid = 1;
            s.write(b).expect("subscribe");
        } else {
            let mut s = v4::Subscribe::new(filter, qos);
            s.pkid = 1;
            s.write(b).expect("subscribe");
        }
    }
}

fn pubrel(pid: u16) -> impl FnOnce(&mut BytesMut, bool) {
    move |b, v5| {
        if v5 {
            v5::PubRel::new(pid).write(b).expect("pubrel");
        } else {
            v4::PubRel::new(pid).write(b).expect("pubrel");
        }
    }
}

fn puback(pid: u16) -> impl FnOnce(&mut BytesMut, bool) {
    move |b, v5| {
        if v5 {
            v5::PubAck::new(pid).write(b).expect("puback");
        } else {
            v4::PubAck::new(pid).write(b).expect("puback");
        }
    }
}

fn disconnect() -> impl FnOnce(&mut BytesMut, bool) {
    |b, v5| {
        if v5 {
            v5::Disconnect::new().write(b).expect("disconnect");
        } else {
            v4::Disconnect.write(b).expect("disconnect");
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// Both protocol versions run every scenario.
fn both(f: impl Fn(bool)) {
    f(false);
    f(true);
}

#[test]
fn receive_maximum_is_enforced_on_inbound_qos2() {
    // v5 only: [MQTT-3.3.4-9] the client may not exceed the Receive Maximum the broker sent.
    runtime().block_on(async {
        let h = harness(false, config());
        let mut c = h.connect("rm", true, true, 0, false).await;
        let now = Instant::now();
        assert_eq!(c.output(now).expect("connack"), vec![Got::ConnAck(false)]);
        for pid in 1..=3 {
            c.send(now, publish("t", QoS::ExactlyOnce, pid, "x"))
                .expect("within Receive Maximum");
        }
        let err = c
            .send(now, publish("t", QoS::ExactlyOnce, 4, "x"))
            .expect_err("one over Receive Maximum");
        assert!(matches!(err, Close::Protocol(ref e) if e.reason_code().as_u8() == 0x93));
    });
}

#[test]
fn qos2_resent_before_pubrel_is_not_delivered_again() {
    both(|v5| {
        runtime().block_on(async {
            let h = harness(false, config());
            let mut sub = h.connect("q2-sub", v5, true, 0, false).await;
            let mut publ = h.connect("q2-pub", v5, true, 0, false).await;
            let now = Instant::now();
            sub.output(now).expect("connack");
            publ.output(now).expect("connack");
            sub.send(now, subscribe("q2/t", QoS::AtMostOnce))
                .expect("subscribe");
            assert_eq!(sub.output(now).expect("suback"), vec![Got::SubAck]);
            // [MQTT-4.3.3-9]: the same packet id again before PUBREL is a re-send.
            publ.send(now, publish("q2/t", QoS::ExactlyOnce, 7, "once"))
                .expect("publish");
            publ.send(now, publish("q2/t", QoS::ExactlyOnce, 7, "once"))
                .expect("re-send");
            assert_eq!(
                publ.output(now).expect("pubrec"),
                vec![Got::PubRec(7), Got::PubRec(7)]
            );
            let got = sub.output(now).expect("delivery");
            assert_eq!(got, vec![Got::Publish("q2/t".into(), 0, b"once".to_vec())]);
            publ.send(now, pubrel(7)).expect("pubrel");
            assert_eq!(publ.output(now).expect("pubcomp"), vec![Got::PubComp(7)]);
            // After PUBREL the id is free: the same id is a new message.
            publ.send(now, publish("q2/t", QoS::ExactlyOnce, 7, "again"))
                .expect("publish");
            publ.output(now).expect("pubrec");
            assert_eq!(
                sub.output(now).expect("delivery"),
                vec![Got::Publish("q2/t".into(), 0, b"again".to_vec())]
            );
        })
    });
}

#[test]
fn puback_waits_for_the_commit_and_the_delivery_does_not_wait_for_the_publisher() {
    both(|v5| {
        runtime().block_on(async {
            let h = harness(true, config());
            let now = Instant::now();
            let mut sub = h.connect("ack-sub", v5, false, 0, false).await;
            h.complete_commits();
            assert_eq!(sub.output(now).expect("connack"), vec![Got::ConnAck(false)]);
            sub.send(now, subscribe("ack/t", QoS::AtLeastOnce))
                .expect("subscribe");
            assert!(
                sub.output(now).expect("nothing yet").is_empty(),
                "SUBACK before its commit"
            );
            h.complete_commits();
            assert_eq!(sub.output(now).expect("suback"), vec![Got::SubAck]);

            let mut publ = h.connect("ack-pub", v5, true, 0, false).await;
            publ.output(now).expect("connack");
            publ.send(now, publish("ack/t", QoS::AtLeastOnce, 3, "m"))
                .expect("publish");
            // Not stored yet: no PUBACK, and nothing visible to the subscriber.
            assert!(
                publ.output(now).expect("no ack").is_empty(),
                "PUBACK before the commit"
            );
            assert!(sub.output(now).expect("no delivery").is_empty());
            // The publisher vanishes before its commit completes ...
            drop(publ);
            // ... and the store still makes the delivery visible once durable.
            h.complete_commits();
            assert_eq!(
                sub.output(now).expect("delivery"),
                vec![Got::Publish("ack/t".into(), 1, b"m".to_vec())]
            );
            sub.send(now, puback(1)).expect("puback");
            sub.output(now).expect("flush");
            h.complete_commits();
            let st = h.broker.registry.stats();
            assert_eq!((st.queued, st.reservations_open), (0, 0));
        })
    });
}

#[test]
fn retained_message_follows_the_suback() {
    both(|v5| {
        runtime().block_on(async {
            let h = harness(false, config());
            let now = Instant::now();
            let mut publ = h.connect("ret-pub", v5, true, 0, false).await;
            publ.output(now).expect("connack");
            publ.send(now, |b, v5| {
                if v5 {
                    let mut p = v5::Publish::new("ret/t", QoS::AtLeastOnce, "kept");
                    p.pkid = 1;
                    p.retain = true;
                    p.write(b).expect("publish");
                } else {
                    let mut p = v4::Publish::new("ret/t", QoS::AtLeastOnce, "kept");
                    p.pkid = 1;
                    p.retain = true;
                    p.write(b).expect("publish");
                }
            })
            .expect("publish");
            let mut sub = h.connect("ret-sub", v5, true, 0, false).await;
            sub.output(now).expect("connack");
            sub.send(now, subscribe("ret/#", QoS::AtLeastOnce))
                .expect("subscribe");
            let got = sub.output(now).expect("suback and retained");
            assert_eq!(got[0], Got::SubAck);
            assert!(matches!(&got[1], Got::Publish(t, _, p) if t == "ret/t" && p == b"kept"));
        })
    });
}

#[test]
fn will_after_a_lost_connection_not_after_disconnect() {
    both(|v5| {
        runtime().block_on(async {
            let h = harness(false, config());
            let now = Instant::now();
            let mut watcher = h.connect("will-w", v5, true, 0, false).await;
            watcher.output(now).expect("connack");
            watcher
                .send(now, subscribe("will/#", QoS::AtLeastOnce))
                .expect("subscribe");
            watcher.output(now).expect("suback");

            // A normal DISCONNECT: no will ([MQTT-3.14.4-3]).
            let mut a = h.connect("will-a", v5, true, 0, true).await;
            a.output(now).expect("connack");
            let close = a.send(now, disconnect()).expect_err("disconnect closes");
            assert!(matches!(close, Close::Normal));
            a.client.finish(close.publishes_will());
            assert!(
                watcher.output(now).expect("none").is_empty(),
                "will after DISCONNECT"
            );

            // The connection is lost: the will is published ([MQTT-3.1.2-8]).
            let b = h.connect("will-b", v5, true, 0, true).await;
            b.client.finish(Close::PeerGone("test").publishes_will());
            let got = watcher.output(now).expect("will");
            assert!(matches!(&got[..], [Got::Publish(t, _, p)] if t == "will/t" && p == b"gone"));
        })
    });
}

#[test]
fn keep_alive_runs_out_at_one_and_a_half_times_and_traffic_resets_it() {
    both(|v5| {
        runtime().block_on(async {
            let h = harness(false, config());
            let start = Instant::now();
            let mut c = h.connect("ka", v5, true, 10, false).await;
            c.client
                .handle_input(start, &mut c.rbuf, &mut c.wbuf)
                .expect("nothing");
            // [MQTT-3.1.2-24]: 1.5 x Keep Alive.
            assert_eq!(
                c.client.poll_timeout(false),
                Some(start + Duration::from_secs(15))
            );
            let at = start + Duration::from_secs(14);
            assert!(c.client.handle_timeout(at, false).is_ok());
            // A PINGREQ at 14 s moves the deadline to 29 s.
            c.send(at, |b, _| {
                let _ = v4::PingReq.write(b);
            })
            .expect("ping");
            assert_eq!(
                c.client.poll_timeout(false),
                Some(at + Duration::from_secs(15))
            );
            assert!(c
                .client
                .handle_timeout(start + Duration::from_secs(20), false)
                .is_ok());
            let late = at + Duration::from_secs(15);
            assert!(matches!(
                c.client.handle_timeout(late, false),
                Err(Close::KeepAlive)
            ));
        })
    });
}

/// A token's expiry is one of the core's deadlines: it closes the connection with
/// `CredentialsExpired` (v5 DISCONNECT 0xA0) even while the client keeps talking, and is the
/// earliest deadline when it comes before keep alive.
#[test]
fn expiring_credentials_close_the_connection_at_their_time() {
    both(|v5| {
        runtime().block_on(async {
            let h = harness(false, config());
            let start = Instant::now();
            let mut c = h.connect("exp", v5, true, 60, false).await;
            c.client.extras = Some(Box::new(super::client::Extras {
                expires_at: Some(start + Duration::from_secs(5)),
                ..Default::default()
            }));
            assert_eq!(
                c.client.poll_timeout(false),
                Some(start + Duration::from_secs(5))
            );
            let at = start + Duration::from_secs(4);
            c.send(at, |b, _| {
                let _ = v4::PingReq.write(b);
            })
            .expect("ping");
            assert!(c.client.handle_timeout(at, false).is_ok());
            let close = c
                .client
                .handle_timeout(start + Duration::from_secs(5), false)
                .expect_err("expired");
            assert!(matches!(close, Close::CredentialsExpired));
            assert_eq!(
                close.reason(),
                Some(crate::protocol::ReasonCode::MaximumConnectTime)
            );
        })
    });
}

#[test]
fn in_flight_window_is_never_exceeded_towards_the_client() {
    // v5: the broker sends at most the client's Receive Maximum unacknowledged (here the
    // broker's own max_inflight = 2 also bounds 3.1.1 clients).
    both(|v5| {
        runtime().block_on(async {
            let mut cfg = config();
            cfg.limits.max_inflight = 2;
            let h = harness(false, cfg);
            let now = Instant::now();
            let mut sub = h.connect("win-sub", v5, true, 0, false).await;
            sub.output(now).expect("connack");
            sub.send(now, subscribe("w/t", QoS::AtLeastOnce))
                .expect("subscribe");
            sub.output(now).expect("suback");
            let mut publ = h.connect("win-pub", v5, true, 0, false).await;
            publ.output(now).expect("connack");
            for pid in 1..=5 {
                publ.send(now, publish("w/t", QoS::AtLeastOnce, pid, "m"))
                    .expect("publish");
                publ.output(now).expect("puback");
            }
            let first = sub.output(now).expect("window");
            assert_eq!(first.len(), 2, "{first:?}");
            sub.send(now, puback(1)).expect("ack");
            assert_eq!(sub.output(now).expect("one more").len(), 1);
        })
    });
}

/// Consumer lag, with the time passed in: a message published at `t` and acknowledged at
/// `t + 3 s` is 3 s late, for the session (its moving average) and for a shared group (its
/// histogram, `tern_queue_delivery_latency_seconds`); before the PUBACK nothing is counted.
#[test]
fn the_latency_of_a_delivery_runs_from_its_publish_to_its_puback() {
    runtime().block_on(async {
        let h = harness(false, config());
        let mut sub = h.connect("lag-sub", true, true, 0, false).await;
        let mut publ = h.connect("lag-pub", true, true, 0, false).await;
        let t = Instant::now();
        sub.output(t).expect("connack");
        publ.output(t).expect("connack");
        sub.send(t, subscribe("lag/t", QoS::AtLeastOnce))
            .expect("subscribe");
        sub.send(t, |b, _| {
            let mut s = v5::Subscribe::new("$share/g/lag/#", QoS::AtLeastOnce);
            s.pkid = 2;
            s.write(b).expect("subscribe");
        })
        .expect("subscribe to the group");
        sub.output(t).expect("subacks");
        publ.send(t, publish("lag/t", QoS::AtLeastOnce, 1, "x"))
            .expect("publish");
        // The group's dispatcher is a task: let it hand the message to its member.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let got = sub.output(t).expect("deliveries");
        let pids: Vec<u16> = got
            .iter()
            .filter_map(|g| match g {
                Got::Publish(_, pid, _) => Some(*pid),
                _ => None,
            })
            .collect();
        assert_eq!(pids.len(), 2, "one direct, one through the group: {got:?}");
        let group = h.broker.groups.all().into_iter().next().expect("the group");
        assert_eq!(group.metrics.latency.get_sample_count(), 0);
        assert_eq!(
            sub.client.handle.outbox.latency(),
            None,
            "nothing acknowledged yet"
        );
        let later = t + Duration::from_secs(3);
        for pid in pids {
            sub.send(later, puback(pid)).expect("puback");
        }
        assert_eq!(group.metrics.latency.get_sample_count(), 1);
        assert_eq!(group.metrics.latency.get_sample_sum(), 3.0);
        assert_eq!(group.queue.outbox.latency(), Some(Duration::from_secs(3)));
        assert_eq!(
            sub.client.handle.outbox.latency(),
            Some(Duration::from_secs(3)),
            "both deliveries were 3 s late"
        );
    });
}
