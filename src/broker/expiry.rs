//! The once-a-second sweep: sessions whose expiry passed while their client was away,
//! retained messages and stored queue heads whose Message Expiry passed, and the rate-limited
//! log line for messages dropped on full queues.

use super::Broker;
use crate::storage::record::unix_now_ms;
use crate::storage::Op;
use std::sync::Arc;
use std::sync::PoisonError;
use std::time::Duration;

/// Overflow is logged at most once per interval (not once per message): how many messages
/// full queues dropped since the last report, in all and per shared subscription group.
#[derive(Default)]
struct DropLog {
    queue_full: u64,
    groups: std::collections::HashMap<String, u64>,
}

impl DropLog {
    fn report(&mut self, broker: &Broker) {
        let total = broker.metrics.dropped_queue_full.get();
        let new = total.saturating_sub(self.queue_full);
        self.queue_full = total;
        if new == 0 {
            return;
        }
        let mut groups = std::collections::HashMap::new();
        for g in broker.groups.all() {
            let key = g.key();
            let now = g.metrics.dropped.get();
            let before = self.groups.get(&key).copied().unwrap_or(0);
            if now > before {
                tracing::warn!(group = %key, dropped = now - before, "shared subscription group queue full: messages dropped");
            }
            groups.insert(key, now);
        }
        self.groups = groups;
        tracing::warn!(
            dropped = new,
            "queues full: messages dropped since the last report (tern_messages_dropped_total{{reason=\"queue_full\"}})"
        );
    }
}

impl Broker {
    /// Ends sessions whose expiry passed while their client was away, and retained messages
    /// whose Message Expiry passed. Runs once a second until the broker stops.
    pub async fn run_expiry(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweeps: u64 = 0;
        let mut drops = DropLog::default();
        loop {
            tick.tick().await;
            let now = crate::clock::now();
            // A trace ends by itself at its time, whether or not its reader says.
            self.tracer.prune();
            for expired in self.registry.take_expired(now) {
                // Nobody is attached (checked under the registry lock), so the state is free.
                if let Ok(mut state) = expired.state.try_lock() {
                    self.end_session(&expired.handle, &mut state);
                }
                tracing::debug!(client_id = %expired.handle.client_id, "session expired");
            }
            let purged = self
                .retained
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .purge_expired(now);
            if purged > 0 {
                self.metrics.dropped_expired.inc_by(purged as u64);
            }
            sweeps += 1;
            // The status page's charts: a point at the first sweep (so they start at once),
            // then every 5 s.
            if sweeps % super::history::INTERVAL.as_secs() == 1 {
                self.sample_history();
            }
            if sweeps.is_multiple_of(10) {
                if self.store.durable() {
                    self.sweep_expired_queues();
                }
                // Declared queues' time to live, also while nobody consumes them.
                self.poke_queues();
                drops.report(&self);
            }
        }
    }

    /// Message expiry on stored data: drops expired messages from the head of the on-disk
    /// queues of sessions whose client is away, so their disk space returns without waiting
    /// for the client (queues are FIFO, so expired messages gather at the head).
    fn sweep_expired_queues(&self) {
        const SWEEP_BATCH: usize = 256;
        let unix = unix_now_ms();
        for handle in self.registry.detached() {
            let Some((from, below, epoch)) = handle.outbox.spill_head() else {
                continue;
            };
            let Ok(entries) = self.store.read_queue(handle.id, from, SWEEP_BATCH) else {
                continue;
            };
            let mut ops = Vec::new();
            let mut bytes = 0;
            let mut next_from = from;
            // What a trace reports once the heads are dropped (only while one is active).
            let mut traced = Vec::new();
            for (seq, e) in entries {
                if seq >= below {
                    break;
                }
                let expired = match self.store.get_message(e.msg_id) {
                    Ok(Some(m)) => match m.expires_at_ms {
                        Some(at) if at <= unix => {
                            bytes += m.weight() as usize;
                            if self.tracer.active() {
                                traced.push((m.id, m.topic));
                            }
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                };
                if !expired {
                    break;
                }
                ops.push(Op::Dequeue {
                    session_id: handle.id,
                    seq,
                });
                next_from = seq + 1;
            }
            let n = ops.len();
            if n > 0
                && handle
                    .outbox
                    .drop_spilled_head(from, next_from, n, bytes, epoch)
            {
                let _ = self.store.submit(ops);
                self.metrics.dropped_expired.inc_by(n as u64);
                for (id, topic) in traced {
                    let target = Some(&*handle.client_id);
                    self.tracer.expired(id, topic.as_str(), target);
                }
            }
        }
    }
}
