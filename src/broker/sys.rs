//! `$SYS/broker/...` topics, named and formatted as Mosquitto publishes them so that existing
//! dashboards and `mosquitto_sub -t '$SYS/#'` work unchanged.
//!
//! Every `[sys_topics] interval` seconds the task reads the broker's own counters and publishes
//! each topic whose value changed (uptime always changes) as a retained QoS 0 message, so a
//! new subscriber sees the current values at once. `$` topics are never persisted (see
//! [`Broker::publish`]) and never match `#` or `+` at the first level ([MQTT-4.7.2-1]).

use super::Broker;
use crate::message::Message;
use crate::protocol::{MqttStr, QoS};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Exponentially weighted per-minute rates over 1, 5 and 15 minutes, as Unix load averages
/// and Mosquitto's `$SYS/broker/load/...` topics.
#[derive(Debug, Default, Clone)]
pub struct Load {
    last: Option<u64>,
    avg: [f64; 3],
}

const WINDOWS: [(f64, &str); 3] = [(60.0, "1min"), (300.0, "5min"), (900.0, "15min")];

impl Load {
    /// Takes the counter's current value `total`, `elapsed` seconds after the previous one.
    pub fn update(&mut self, total: u64, elapsed: f64) {
        let Some(last) = self.last.replace(total) else {
            return;
        };
        if elapsed <= 0.0 {
            return;
        }
        let per_minute = total.saturating_sub(last) as f64 * 60.0 / elapsed;
        for (avg, (window, _)) in self.avg.iter_mut().zip(WINDOWS) {
            let decay = (-elapsed / window).exp();
            *avg = *avg * decay + per_minute * (1.0 - decay);
        }
    }
}

/// The counters `$SYS` reports, read once per interval.
struct Sample {
    packets_received: u64,
    packets_sent: u64,
    publish_received: u64,
    publish_sent: u64,
    publish_dropped: u64,
    bytes_received: u64,
    bytes_sent: u64,
    connections: u64,
}

impl Sample {
    fn read(b: &Broker) -> Sample {
        let m = &b.metrics;
        Sample {
            packets_received: m.packets_received.total(),
            packets_sent: m.packets_sent.total(),
            publish_received: m.publish_received(),
            publish_sent: m.publish_sent(),
            publish_dropped: m.dropped_total(),
            bytes_received: m.bytes_received.get(),
            bytes_sent: m.bytes_sent.get(),
            connections: m.connections_total.get(),
        }
    }
}

/// State kept between publications: the load averages and the last value of each topic.
#[derive(Default)]
pub struct SysTree {
    loads: [Load; 9],
    published: HashMap<String, String>,
    last_tick: Option<Instant>,
}

const LOAD_TOPICS: [&str; 9] = [
    "messages/received",
    "messages/sent",
    "publish/received",
    "publish/sent",
    "publish/dropped",
    "bytes/received",
    "bytes/sent",
    "connections",
    "sockets",
];

impl SysTree {
    /// Every `$SYS` topic with its current value.
    fn values(&mut self, b: &Broker, now: Instant) -> Vec<(String, String)> {
        let s = Sample::read(b);
        let elapsed = self
            .last_tick
            .replace(now)
            .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        let totals = [
            s.packets_received,
            s.packets_sent,
            s.publish_received,
            s.publish_sent,
            s.publish_dropped,
            s.bytes_received,
            s.bytes_sent,
            s.connections,
            s.connections,
        ];
        for (load, total) in self.loads.iter_mut().zip(totals) {
            load.update(total, elapsed);
        }
        let st = b.registry.stats();
        let retained = b.retained_count();
        let mut v: Vec<(String, String)> = vec![
            (
                "version".into(),
                format!("tern version {}", env!("CARGO_PKG_VERSION")),
            ),
            (
                "uptime".into(),
                format!("{} seconds", b.metrics.uptime().as_secs()),
            ),
            ("clients/connected".into(), st.online.to_string()),
            ("clients/active".into(), st.online.to_string()),
            ("clients/disconnected".into(), st.offline.to_string()),
            ("clients/inactive".into(), st.offline.to_string()),
            ("clients/total".into(), (st.online + st.offline).to_string()),
            (
                "clients/maximum".into(),
                b.metrics.connections_max().to_string(),
            ),
            ("messages/received".into(), s.packets_received.to_string()),
            ("messages/sent".into(), s.packets_sent.to_string()),
            ("messages/stored".into(), (retained + st.queued).to_string()),
            (
                "store/messages/count".into(),
                (retained + st.queued).to_string(),
            ),
            (
                "publish/messages/received".into(),
                s.publish_received.to_string(),
            ),
            ("publish/messages/sent".into(), s.publish_sent.to_string()),
            (
                "publish/messages/dropped".into(),
                s.publish_dropped.to_string(),
            ),
            ("bytes/received".into(), s.bytes_received.to_string()),
            ("bytes/sent".into(), s.bytes_sent.to_string()),
            (
                "subscriptions/count".into(),
                b.subscription_count().to_string(),
            ),
            ("retained messages/count".into(), retained.to_string()),
        ];
        for q in b.queue_states() {
            let at = format!("queues/{}", q.name);
            v.push((format!("{at}/messages"), q.messages.to_string()));
            v.push((format!("{at}/consumers"), q.consumers.to_string()));
            v.push((
                format!("{at}/oldest_age"),
                format!("{} seconds", q.oldest_age),
            ));
        }
        if let Some(p) = b.peers() {
            v.push(("cluster/node".into(), p.node().to_string()));
            v.push(("cluster/members".into(), p.members().join(",")));
            v.push((
                "cluster/available".into(),
                u8::from(p.available()).to_string(),
            ));
        }
        for (load, name) in self.loads.iter().zip(LOAD_TOPICS) {
            for (avg, (_, window)) in load.avg.iter().zip(WINDOWS) {
                v.push((format!("load/{name}/{window}"), format!("{avg:.2}")));
            }
        }
        v
    }

    /// Publishes the topics whose value changed since the last call; returns how many.
    pub fn publish(&mut self, b: &Arc<Broker>, now: Instant) -> usize {
        let mut n = 0;
        for (suffix, value) in self.values(b, now) {
            let topic = format!("$SYS/broker/{suffix}");
            if self.published.get(&topic) == Some(&value) {
                continue;
            }
            let msg = Arc::new(Message {
                id: b.next_message_id(),
                topic: MqttStr::from(topic.as_str()),
                payload: Bytes::from(value.clone().into_bytes()),
                qos: QoS::AtMostOnce,
                retain: true,
                properties: Default::default(),
                expires_at: None,
                origin: 0,
                // QoS 0 only: no acknowledgement, no latency to measure.
                received: None,
            });
            b.publish_detached(&msg);
            self.published.insert(topic, value);
            n += 1;
        }
        n
    }
}

/// Publishes `$SYS` topics until the broker stops. The interval is read every round, so a
/// reload that changes `sys_topics.interval` takes effect at the next publication; while it
/// is 0 nothing is published.
pub async fn run(broker: Arc<Broker>) {
    let mut tree = SysTree::default();
    loop {
        let interval = broker.sys_interval();
        if interval == 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        tree.publish(&broker, crate::clock::now());
        tokio::time::sleep(Duration::from_secs(interval)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_average_converges_to_the_per_minute_rate() {
        let mut l = Load::default();
        let mut total = 0;
        l.update(total, 0.0);
        // 10 messages per second = 600 per minute, sampled every 10 s for two hours.
        for _ in 0..720 {
            total += 100;
            l.update(total, 10.0);
        }
        assert!((l.avg[0] - 600.0).abs() < 1.0, "{:?}", l.avg);
        assert!((l.avg[1] - 600.0).abs() < 1.0, "{:?}", l.avg);
        assert!((l.avg[2] - 600.0).abs() < 5.0, "{:?}", l.avg);
        // The 1-minute average reacts faster than the 15-minute one when traffic stops.
        l.update(total, 60.0);
        assert!(l.avg[0] < l.avg[2], "{:?}", l.avg);
    }

    #[test]
    fn first_sample_and_zero_elapsed_only_set_the_baseline() {
        let mut l = Load::default();
        l.update(1000, 5.0);
        assert_eq!(l.avg, [0.0; 3]);
        l.update(2000, 0.0);
        assert_eq!(l.avg, [0.0; 3]);
    }
}
