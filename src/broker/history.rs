//! The last fifteen minutes at a glance: a ring buffer of the broker's messages in and out,
//! messages queued and connections, one point every [`INTERVAL`], for the status page's
//! charts. An operator watching a burst sees the queued line rise and come down as the
//! consumers level it, rather than reading numbers that change every two seconds.
//!
//! Sampled by the once-a-second sweep (`expiry.rs`) every [`INTERVAL`], whether or not anyone
//! looks, so the charts have a past when the page is opened. Bounded: [`POINTS`] points of a
//! few numbers each. Sans-IO: [`History::record`] takes the time and the counters, so a test
//! drives it without a broker or a clock.

use super::Broker;
use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Time between two points.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Points kept: fifteen minutes of [`INTERVAL`]s.
pub const POINTS: usize = 180;

/// The broker at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Wall-clock time of the point, Unix seconds (for the chart's axis).
    pub unix: u64,
    /// PUBLISH packets received from clients per second since the previous point.
    pub received_per_second: f64,
    /// PUBLISH packets sent to clients per second since the previous point.
    pub sent_per_second: f64,
    /// Messages waiting in session and group queues (memory and disk).
    pub queued: u64,
    /// Client connections open.
    pub connections: i64,
}

struct Inner {
    points: VecDeque<Point>,
    /// The counters at the previous point, for its rates.
    last: Option<(Instant, u64, u64)>,
}

/// The ring buffer of [`Point`]s.
pub struct History {
    inner: Mutex<Inner>,
}

impl Default for History {
    fn default() -> Self {
        History {
            inner: Mutex::new(Inner {
                points: VecDeque::with_capacity(POINTS),
                last: None,
            }),
        }
    }
}

impl History {
    /// Adds a point at `now` (Unix second `unix`) from the counters of messages `received`
    /// and `sent` so far, and the `queued` and `connections` now. The first point's rates
    /// are 0 (nothing to compare with); the oldest point goes once [`POINTS`] are kept.
    pub fn record(
        &self,
        now: Instant,
        unix: u64,
        received: u64,
        sent: u64,
        queued: u64,
        connections: i64,
    ) {
        let mut h = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (received_per_second, sent_per_second) = match h.last {
            Some((at, r, s)) => {
                let secs = now.saturating_duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    (
                        received.saturating_sub(r) as f64 / secs,
                        sent.saturating_sub(s) as f64 / secs,
                    )
                } else {
                    (0.0, 0.0)
                }
            }
            None => (0.0, 0.0),
        };
        h.last = Some((now, received, sent));
        if h.points.len() == POINTS {
            h.points.pop_front();
        }
        h.points.push_back(Point {
            unix,
            received_per_second,
            sent_per_second,
            queued,
            connections,
        });
    }

    /// The points kept, oldest first.
    pub fn points(&self) -> Vec<Point> {
        let h = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        h.points.iter().copied().collect()
    }
}

impl Broker {
    /// Takes a point of the broker now (one pass over the sessions' queue counts, the scrape's
    /// cost, every [`INTERVAL`]).
    pub(super) fn sample_history(&self) {
        let m = &self.metrics;
        let sessions = self.registry.stats().queued as u64;
        let groups: u64 = self
            .groups
            .all()
            .iter()
            .map(|g| g.queue.outbox.len() as u64)
            .sum();
        self.history.record(
            crate::clock::now(),
            crate::storage::record::unix_now_ms() / 1000,
            m.publish_received(),
            m.publish_sent(),
            sessions + groups,
            m.connections.get(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_fifteen_minutes_with_rates_between_points() {
        let h = History::default();
        let t0 = Instant::now();
        // A burst: 500 messages in during the third interval, drained over the next three.
        let mut received = 0;
        let mut sent = 0;
        for i in 0..(POINTS as u64 + 20) {
            if i == 3 {
                received += 500;
            }
            if (4..7).contains(&i) {
                sent += 100;
            }
            let queued = received - sent - if i >= 7 { 200 } else { 0 };
            let at = t0 + INTERVAL * u32::try_from(i).expect("small");
            h.record(at, 1_000 + i * 5, received, sent, queued, 3);
            if i == 7 {
                let p = h.points();
                assert_eq!(p.len(), 8);
                assert_eq!(p[0].received_per_second, 0.0, "no rate for the first point");
                assert_eq!(p[3].received_per_second, 100.0, "500 in 5 s");
                assert_eq!(p[4].sent_per_second, 20.0);
                let queued: Vec<u64> = p.iter().map(|p| p.queued).collect();
                assert_eq!(queued, [0, 0, 0, 500, 400, 300, 200, 0]);
            }
        }
        let p = h.points();
        assert_eq!(p.len(), POINTS, "bounded");
        assert_eq!(p[0].unix, 1_000 + 20 * 5, "the oldest went first");
        assert_eq!(p[POINTS - 1].connections, 3);
    }
}
