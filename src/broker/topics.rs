//! Which topics are busy: a sample of published topics for the status page.
//!
//! One message in [`SAMPLE_EVERY`] (by message id) is counted per topic, in a map of at most
//! [`MAX_TOPICS`] topics: the publish path pays one modulo per message and a short lock per
//! sampled one, and memory stays bounded whatever the topic count. The router records; the
//! status page (`status.rs`, a layer above) takes the counts when someone looks.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// One message in this many is counted for the per-topic rates.
pub const SAMPLE_EVERY: u64 = 16;
/// Distinct topics counted per interval; further topics in the same interval are not counted.
pub const MAX_TOPICS: usize = 1024;
/// Per-topic counts of sampled messages since the last snapshot.
#[derive(Default)]
pub struct TopicSampler {
    counts: Mutex<HashMap<Box<str>, u64>>,
}

impl TopicSampler {
    /// Counts message `id` on `topic` if it is in the sample. Broker topics (`$SYS`) are not
    /// counted.
    pub fn record(&self, id: u64, topic: &str) {
        if !id.is_multiple_of(SAMPLE_EVERY) || topic.starts_with('$') {
            return;
        }
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(topic) {
            *n += 1;
        } else if counts.len() < MAX_TOPICS {
            counts.insert(topic.into(), 1);
        }
    }

    /// The counts so far; counting starts again from zero.
    pub fn take(&self) -> HashMap<Box<str>, u64> {
        std::mem::take(&mut *self.counts.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_counts_one_in_n_and_stays_bounded() {
        let s = TopicSampler::default();
        for id in 0..(SAMPLE_EVERY * 10) {
            s.record(id, "a/b");
            s.record(id, "$SYS/broker/uptime");
        }
        let counts = s.take();
        assert_eq!(counts.get("a/b"), Some(&10));
        assert!(!counts.contains_key("$SYS/broker/uptime"));
        assert!(s.take().is_empty(), "take starts again from zero");
        for i in 0..(MAX_TOPICS as u64 + 100) {
            s.record(i * SAMPLE_EVERY, &format!("t/{i}"));
        }
        assert_eq!(s.take().len(), MAX_TOPICS);
    }
}
