//! Consumer lag: which consumers fall behind, and by how long (issue 18, part 3).
//!
//! Every queue (a session's, a `$share` group's, a declared queue's, a bridge's) can tell the
//! age of its oldest waiting message ([`Broker::queue_oldest_age`]) and keeps a moving average
//! of the publish-to-acknowledge latency of its deliveries (`Outbox::latency`, fed by the
//! consumer's connection on PUBACK/PUBCOMP). Groups also export both as Prometheus series (a
//! bounded set: the groups that exist). Sessions never do, since one series per client id
//! would grow without bound; this file ranks them instead, for the status page: the slowest
//! few by oldest waiting message and by latency, worked out when someone looks.

use super::shared::Kind;
use super::Broker;
use std::time::Duration;

/// Disk heads read from the store per look, at most: after a restart every offline session's
/// queue is on disk with its head's time unknown; each look learns this many more (the queue
/// keeps what it learnt), so a look stays cheap with a million sessions.
const DISK_READS_PER_LOOK: usize = 256;

/// One consumer as the ranking sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerLag {
    /// `session`, `shared`, `queue` or `bridge`.
    pub kind: &'static str,
    /// A session's client id; a group's name (`SHARE/FILTER` for a `$share` group).
    pub name: String,
    /// A session: its client is connected. A group: it has a member (a bridge: always).
    pub online: bool,
    /// Messages waiting (memory and disk).
    pub queued: usize,
    /// A session: QoS 1/2 deliveries sent and not yet acknowledged. A group: its members.
    pub inflight_or_members: usize,
    /// Seconds the oldest waiting message has waited (0: none, or not known yet).
    pub oldest_age: u64,
    /// Moving average of the publish-to-acknowledge latency; None before any acknowledgement.
    pub latency: Option<Duration>,
}

/// The slowest consumers, two ways.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Slowest {
    /// Those with waiting messages, oldest first (then deepest).
    pub by_oldest_age: Vec<ConsumerLag>,
    /// Those with a latency, slowest first.
    pub by_latency: Vec<ConsumerLag>,
}

/// The `n` slowest of `all` both ways. Sans-IO (the ages are already in), so a test can feed
/// it whatever it likes.
pub fn rank(all: Vec<ConsumerLag>, n: usize) -> Slowest {
    let mut by_oldest_age: Vec<ConsumerLag> = all
        .iter()
        .filter(|c| c.queued > 0 || c.oldest_age > 0)
        .cloned()
        .collect();
    let age = |c: &ConsumerLag| std::cmp::Reverse((c.oldest_age, c.queued));
    top(&mut by_oldest_age, n, |a, b| {
        age(a).cmp(&age(b)).then_with(|| a.name.cmp(&b.name))
    });
    let mut by_latency: Vec<ConsumerLag> =
        all.into_iter().filter(|c| c.latency.is_some()).collect();
    top(&mut by_latency, n, |a, b| {
        b.latency.cmp(&a.latency).then_with(|| a.name.cmp(&b.name))
    });
    Slowest {
        by_oldest_age,
        by_latency,
    }
}

/// Keeps the first `n` of `v` by `cmp`, sorted: a partial selection, then a sort of the few.
fn top(
    v: &mut Vec<ConsumerLag>,
    n: usize,
    cmp: impl Fn(&ConsumerLag, &ConsumerLag) -> std::cmp::Ordering,
) {
    if v.len() > n && n > 0 {
        v.select_nth_unstable_by(n - 1, &cmp);
        v.truncate(n);
    } else if n == 0 {
        v.clear();
    }
    v.sort_by(cmp);
}

impl Broker {
    /// The `n` slowest consumers (sessions and groups alike) by oldest waiting message and by
    /// latency, at Unix second `now`. One pass over the sessions' handles (the registry lock
    /// is held only to copy them) and the groups; at most [`DISK_READS_PER_LOOK`] store reads.
    pub fn slowest_consumers(&self, n: usize, now: u64) -> Slowest {
        let mut reads = 0;
        let mut all = Vec::new();
        for h in self.registry.handles() {
            let (queued, _) = h.outbox.counts();
            let on_disk = queued > 0 && h.outbox.oldest_on_disk();
            // Past the budget, a head only the store knows reads 0 until a later look.
            let oldest_age = if queued == 0 || (on_disk && reads >= DISK_READS_PER_LOOK) {
                0
            } else {
                reads += usize::from(on_disk);
                self.queue_oldest_age(&h, now)
            };
            all.push(ConsumerLag {
                kind: "session",
                name: h.client_id.to_string(),
                online: h.outbox.is_online(),
                queued,
                inflight_or_members: h.inflight.load(std::sync::atomic::Ordering::Relaxed),
                oldest_age,
                latency: h.outbox.latency(),
            });
        }
        for g in self.groups.all() {
            let kind = match g.kind {
                Kind::Shared => "shared",
                Kind::Queue => "queue",
                Kind::Bridge => "bridge",
            };
            let (_, name) = crate::metrics::lag_labels(kind, &g.share, &g.filter());
            let members = g.member_count();
            all.push(ConsumerLag {
                kind,
                name,
                online: members > 0 || g.kind == Kind::Bridge,
                queued: g.queue.outbox.len(),
                inflight_or_members: members,
                oldest_age: self.queue_oldest_age(&g.queue, now),
                latency: g.queue.outbox.latency(),
            });
        }
        rank(all, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, queued: usize, age: u64, latency_ms: Option<u64>) -> ConsumerLag {
        ConsumerLag {
            kind: "session",
            name: name.to_string(),
            online: true,
            queued,
            inflight_or_members: 0,
            oldest_age: age,
            latency: latency_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn the_slowest_come_first_and_idle_consumers_are_left_out() {
        let all = vec![
            c("idle", 0, 0, None),
            c("fresh", 5, 1, Some(3)),
            c("stuck", 100, 600, None),
            c("slow", 2, 30, Some(9_000)),
            c("deep", 5_000, 30, Some(40)),
        ];
        let s = rank(all, 3);
        let names = |v: &[ConsumerLag]| v.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        // Oldest first; equal ages: the deeper first. "idle" has nothing waiting.
        assert_eq!(names(&s.by_oldest_age), ["stuck", "deep", "slow"]);
        assert_eq!(names(&s.by_latency), ["slow", "deep", "fresh"]);
        assert_eq!(rank(vec![c("a", 1, 1, Some(1))], 0), Slowest::default());
    }

    /// Ages and latencies of a broker's queues, with the time passed in: the age grows with
    /// the time while nothing drains, and counts from the oldest message.
    #[tokio::test]
    async fn the_oldest_age_of_a_queue_that_does_not_drain_grows() {
        use crate::message::Message;
        use crate::outbox::{Delivery, SubIds};
        use crate::protocol::{MqttStr, PublishProperties, QoS};
        use crate::session::registry::SessionHandle;
        use std::sync::Arc;

        let config = crate::config::Config::default();
        let auth = crate::auth::Authorizer::load(&config.mqtt.response_prefix, &config.auth)
            .expect("no auth files");
        let b = Broker::new(
            config,
            crate::metrics::Metrics::new().expect("metrics"),
            Arc::new(crate::storage::MemoryStore),
            auth,
        );
        let (slow, fast) = (b.registry.allocate_id(), b.registry.allocate_id());
        let handle = |id: u64, cid: &str| {
            Arc::new(SessionHandle::new(
                id,
                Arc::from(cid),
                crate::outbox::Outbox::new(100, 1 << 20),
                false,
            ))
        };
        let (s, f) = (handle(slow, "slow"), handle(fast, "fast"));
        let push = |h: &SessionHandle, enqueued: u32| {
            let msg = Arc::new(Message {
                id: 1,
                topic: MqttStr::from("t"),
                payload: bytes::Bytes::new(),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: PublishProperties::default(),
                expires_at: None,
                origin: 0,
                received: None,
            });
            let mut d = Delivery::new(msg, QoS::AtLeastOnce, false, SubIds::None);
            d.enqueued = enqueued;
            h.outbox.push(d);
        };
        let now: u64 = 1_800_000_000;
        let at = |ago: u64| u32::try_from(now - ago).expect("fits");
        push(&s, at(120));
        push(&s, at(5));
        push(&f, at(1));
        f.outbox.acknowledged(Duration::from_millis(4));
        s.outbox.acknowledged(Duration::from_secs(2));
        assert_eq!(b.queue_oldest_age(&s, now), 120);
        assert_eq!(
            b.queue_oldest_age(&s, now + 60),
            180,
            "it grows with the time"
        );
        assert_eq!(b.queue_oldest_age(&f, now), 1);
        assert_eq!(s.outbox.latency(), Some(Duration::from_secs(2)));
    }
}
