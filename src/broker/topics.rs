//! Which topics are busy: per-topic message rates for the status page.
//!
//! The rate of a topic is an exponentially decayed count of its messages (time constant
//! [`TAU`]): each message adds one, and the count loses `1 - e^(-dt/TAU)` of itself as time
//! passes, so a topic publishing `r` messages a second settles at `r * TAU` and its rate reads
//! as count / TAU, whenever one looks. A steady 2.5 msg/s topic therefore reads 2.5/s at every
//! look, instead of the 0 or 14.8 of counting a 1-in-16 sample between two looks two seconds
//! apart (the estimator this replaces). A topic seen for less than [`TAU`] is divided by the
//! time it has been seen instead (the count has not built up yet).
//!
//! Cost on the publish path: one relaxed load per message, and a short lock per counted one.
//! While the broker is quiet, every message is counted, so the rates are exact; once messages
//! come faster than [`TARGET_PER_SECOND`], one in `every` (a power of two, at most
//! [`MAX_EVERY`]) is counted, weighted by `every`. Which ones is decided by a mix of the
//! message id, not the id itself: with `id % 16`, sixteen topics published in turn would put
//! every count on one of them. Memory stays bounded: at most [`MAX_TOPICS`] topics are
//! followed; when full, the quietest quarter is let go.
//!
//! Sans-IO: [`TopicSampler::record_at`] and [`TopicSampler::top`] take the time, so a test
//! feeds a steady rate without sleeping. The router records; the status page (`status.rs`, a
//! layer above) reads the top topics when someone looks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Time constant of the decayed counts: about the last half minute counts.
pub const TAU: Duration = Duration::from_secs(30);
/// Topics followed at most.
pub const MAX_TOPICS: usize = 1024;
/// Counted messages per second above which only one in `every` is counted.
pub const TARGET_PER_SECOND: f64 = 4096.0;
/// One message in this many is counted at most, however busy the broker.
pub const MAX_EVERY: u64 = 64;
/// How often the broker-wide rate (from the message ids) is looked at to choose `every`.
const RETUNE: Duration = Duration::from_secs(1);

/// One topic's decayed count.
#[derive(Debug, Clone, Copy)]
struct Rate {
    /// The count at `at` (decayed up to then).
    count: f64,
    at: Instant,
    /// When the topic was first counted (the count builds up from there).
    since: Instant,
}

impl Rate {
    /// The count decayed to `now`.
    fn count_at(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.count * (-dt / TAU.as_secs_f64()).exp()
    }

    /// Messages per second at `now`.
    fn per_second(&self, now: Instant) -> f64 {
        let seen = now.saturating_duration_since(self.since).as_secs_f64();
        let tau = TAU.as_secs_f64();
        // The count of a steady rate r seen for s seconds is r·τ·(1 - e^(-s/τ)). At least a
        // second, so a topic's first message does not read as a burst.
        let built = tau * (1.0 - (-seen.max(1.0) / tau).exp());
        self.count_at(now) / built
    }
}

struct Counts {
    topics: HashMap<Box<str>, Rate>,
    /// The message id and time `every` was last chosen at.
    tuned: Option<(u64, Instant)>,
}

/// Per-topic decayed message counts.
pub struct TopicSampler {
    /// One message in this many is counted (a power of two); read once per message.
    every: AtomicU64,
    counts: Mutex<Counts>,
}

impl Default for TopicSampler {
    fn default() -> Self {
        TopicSampler {
            every: AtomicU64::new(1),
            counts: Mutex::new(Counts {
                topics: HashMap::new(),
                tuned: None,
            }),
        }
    }
}

/// A mix of the message id (splitmix64's finaliser): which messages are counted, spread
/// evenly whatever the pattern of topics.
fn mix(id: u64) -> u64 {
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl TopicSampler {
    /// Counts message `id` on `topic`, at the broker's clock. Broker topics (`$SYS`) are not
    /// counted.
    pub fn record(&self, id: u64, topic: &str) {
        if self.counted(id, topic) {
            self.count(id, topic, crate::clock::now());
        }
    }

    /// [`TopicSampler::record`] at time `now`.
    pub fn record_at(&self, id: u64, topic: &str, now: Instant) {
        if self.counted(id, topic) {
            self.count(id, topic, now);
        }
    }

    /// One message in how many is counted now.
    pub fn every(&self) -> u64 {
        self.every.load(Ordering::Relaxed)
    }

    fn counted(&self, id: u64, topic: &str) -> bool {
        let every = self.every.load(Ordering::Relaxed);
        (every <= 1 || mix(id) & (every - 1) == 0) && !topic.starts_with('$')
    }

    fn count(&self, id: u64, topic: &str, now: Instant) {
        let weight = self.every.load(Ordering::Relaxed) as f64;
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        match c.tuned {
            None => c.tuned = Some((id, now)),
            Some((from, at)) if now.saturating_duration_since(at) >= RETUNE => {
                // Message ids are handed out broker-wide, so their pace is the broker's rate.
                let secs = now.saturating_duration_since(at).as_secs_f64();
                let rate = id.saturating_sub(from) as f64 / secs;
                let every = (rate / TARGET_PER_SECOND).ceil().max(1.0) as u64;
                let every = every.next_power_of_two().min(MAX_EVERY);
                self.every.store(every, Ordering::Relaxed);
                c.tuned = Some((id, now));
            }
            Some(_) => {}
        }
        if let Some(r) = c.topics.get_mut(topic) {
            r.count = r.count_at(now) + weight;
            r.at = now;
            return;
        }
        if c.topics.len() >= MAX_TOPICS {
            // Let the quietest quarter go, at once (amortised: one sort per MAX_TOPICS / 4
            // new topics, not a scan per message).
            let mut all: Vec<(f64, Box<str>)> = c
                .topics
                .iter()
                .map(|(t, r)| (r.count_at(now), t.clone()))
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0));
            for (_, t) in all.into_iter().take(MAX_TOPICS / 4) {
                c.topics.remove(&t);
            }
        }
        c.topics.insert(
            topic.into(),
            Rate {
                count: weight,
                at: now,
                since: now,
            },
        );
    }

    /// The `n` busiest topics at `now`, busiest first, with their messages per second.
    /// Topics that fell below 0.01/s are no longer followed.
    pub fn top(&self, n: usize, now: Instant) -> Vec<(Box<str>, f64)> {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.topics.retain(|_, r| r.per_second(now) >= 0.01);
        let mut all: Vec<(Box<str>, f64)> = c
            .topics
            .iter()
            .map(|(t, r)| (t.clone(), r.per_second(now)))
            .collect();
        drop(c);
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate_of(s: &TopicSampler, topic: &str, now: Instant) -> f64 {
        s.top(100, now)
            .into_iter()
            .find(|(t, _)| &**t == topic)
            .map_or(0.0, |(_, r)| r)
    }

    /// The case: a steady 2.5 msg/s topic, looked at every two seconds (as the page
    /// does), reads 2.5/s within a narrow band at every look, among other topics.
    #[test]
    fn a_steady_topic_reads_steady() {
        let s = TopicSampler::default();
        let t0 = Instant::now();
        let mut id = 0;
        let mut looks = 0;
        // 120 s: the 2.5/s topic every 400 ms, a 10/s topic every 100 ms, `$SYS` now and then.
        for tick in 0..1200u64 {
            let now = t0 + Duration::from_millis(tick * 100);
            id += 1;
            s.record_at(id, "plant/line1/temp", now);
            if tick % 4 == 0 {
                id += 1;
                s.record_at(id, "plant/line2/temp", now);
            }
            if tick % 50 == 0 {
                id += 1;
                s.record_at(id, "$SYS/broker/uptime", now);
            }
            // From the tenth second on: a topic just seen reads high by one message over the
            // time it has been seen (its first message counts whole), 4% at ten seconds.
            if tick % 20 == 10 && tick >= 100 {
                looks += 1;
                let r = rate_of(&s, "plant/line2/temp", now);
                assert!((2.2..=2.8).contains(&r), "at {tick}: {r}");
                let busy = rate_of(&s, "plant/line1/temp", now);
                assert!((9.0..=11.0).contains(&busy), "at {tick}: {busy}");
            }
        }
        assert_eq!(looks, 55);
        assert_eq!(s.every(), 1, "a quiet broker counts every message");
        let end = t0 + Duration::from_secs(120);
        let top = s.top(10, end);
        assert_eq!(top.len(), 2, "{top:?}");
        assert_eq!(&*top[0].0, "plant/line1/temp");
        // Silence: the rate decays (to about a third after TAU) and the topic is let go.
        let later = rate_of(&s, "plant/line2/temp", end + TAU);
        assert!((0.8..=1.0).contains(&later), "{later}");
        assert!(s.top(10, end + TAU * 20).is_empty());
    }

    /// A busy broker counts one message in `every` (weighted by it), spread over the topics
    /// whatever their order: sixteen topics published in turn all read about the same.
    #[test]
    fn a_busy_broker_samples_evenly() {
        let s = TopicSampler::default();
        let t0 = Instant::now();
        let mut id = 0;
        // 32,000 msg/s for 20 s, round robin over 16 topics (2,000/s each).
        for ms in 0..20_000u64 {
            let now = t0 + Duration::from_millis(ms);
            for _ in 0..32 {
                id += 1;
                s.record_at(id, &format!("t/{}", id % 16), now);
            }
        }
        assert_eq!(s.every(), 8);
        let now = t0 + Duration::from_secs(20);
        let top = s.top(16, now);
        assert_eq!(top.len(), 16);
        for (t, r) in &top {
            assert!((1700.0..=2300.0).contains(r), "{t}: {r}");
        }
    }

    #[test]
    fn topics_stay_bounded_and_the_busy_ones_stay() {
        let s = TopicSampler::default();
        let t0 = Instant::now();
        let mut id = 0;
        for i in 0..(MAX_TOPICS as u64 * 3) {
            let now = t0 + Duration::from_millis(i);
            id += 1;
            s.record_at(id, &format!("once/{i}"), now);
            if i % 2 == 0 {
                id += 1;
                s.record_at(id, "busy", now);
            }
        }
        let now = t0 + Duration::from_millis(MAX_TOPICS as u64 * 3);
        let top = s.top(usize::MAX, now);
        assert!(top.len() <= MAX_TOPICS, "{}", top.len());
        assert_eq!(&*top[0].0, "busy");
    }
}
