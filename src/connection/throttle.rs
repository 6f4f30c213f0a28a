//! When a connection stops reading its client, and for how long: the publish rate budgets
//! (`limits.max_publish_rate`, `limits.max_publish_bytes_rate`) and back-pressure from a
//! subscriber queue the client's publishes filled.
//!
//! Throttling is by not reading: the client's packets stay in the kernel's buffers and TCP
//! pushes back on it, so a fast publisher costs neither memory here nor a refusal it would have
//! to handle. The [`TokenBucket`] is also the listener's accept rate limit
//! (`limits.max_connect_rate`), the same fact ("n per second, at most one second's worth")
//! applied to connections.

use super::client::Client;
use std::time::{Duration, Instant};

/// How often a publisher paused by back-pressure looks at the queue again.
const BACKPRESSURE_POLL: Duration = Duration::from_millis(5);

/// A token bucket: `rate` tokens per second, holding at most one second's worth. `take` may
/// run it into debt (a packet already read must be handled); the owner then waits
/// [`TokenBucket::wait`] before taking more.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// The bucket for a configured limit of `rate` per second, full; None for 0, which every
    /// rate limit (`max_connect_rate`, `max_publish_rate`, `max_publish_bytes_rate`) takes to
    /// mean "no limit".
    pub(crate) fn per_second(rate: u32, now: Instant) -> Option<TokenBucket> {
        (rate > 0).then(|| TokenBucket::new(f64::from(rate), now))
    }

    fn new(rate: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: rate,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
    }

    /// Takes `n` tokens if that many are there.
    pub(crate) fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, going into debt if needed.
    fn take(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens -= n;
    }

    /// How long until the bucket is out of debt (None: it is not in debt).
    fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

impl Client {
    /// How long until this client's publish budget allows reading on (None: it does now).
    pub(super) fn throttle_wait(&mut self) -> Option<Duration> {
        if let Some(queue) = &self.pressure {
            // Back-pressure: wait while the queue is above half and someone drains it (a queue
            // nobody is connected to would never drain: then its limit drops messages instead).
            if queue.outbox.drained_and_above(1, 2) {
                return Some(BACKPRESSURE_POLL);
            }
            self.pressure = None;
        }
        let now = self.now;
        let budgets = self.publish_budgets.as_mut()?;
        let a = budgets.messages.as_mut().and_then(|b| b.wait(now));
        let b = budgets.bytes.as_mut().and_then(|b| b.wait(now));
        a.max(b)
    }

    /// Charges one PUBLISH of `size` bytes to the publish budgets.
    pub(super) fn charge_publish(&mut self, size: usize) {
        let now = self.now;
        let Some(budgets) = self.publish_budgets.as_mut() else {
            return;
        };
        if let Some(b) = budgets.messages.as_mut() {
            b.take(1.0, now);
        }
        if let Some(b) = budgets.bytes.as_mut() {
            b.take(size as f64, now);
        }
    }
}

/// A connection's publish budgets (`limits.max_publish_rate`, `limits.max_publish_bytes_rate`).
#[derive(Debug)]
pub(super) struct PublishBudgets {
    messages: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
}

impl PublishBudgets {
    /// None when neither limit is set (0 means no limit).
    pub(super) fn new(messages: u32, bytes: u32, now: Instant) -> Option<Box<PublishBudgets>> {
        let budgets = PublishBudgets {
            messages: TokenBucket::per_second(messages, now),
            bytes: TokenBucket::per_second(bytes, now),
        };
        (budgets.messages.is_some() || budgets.bytes.is_some()).then(|| Box::new(budgets))
    }
}
