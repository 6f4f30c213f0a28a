//! Per-connection tallies of what a connection received and sent, added to the broker's shared
//! counters once per read or write batch.
//!
//! Why not bump the shared counters directly: they are atomics every connection touches, and
//! contending on them once per message costs more across cores than the message itself. A
//! connection counts into its own [`Tally`] and [`Client::flush_tally`] adds it up when a batch
//! ends (and when the connection closes), so the metrics lag by at most one batch.

use super::client::Client;

/// Counts of one batch (a read of at most 64 KiB, or what one pass of output encodes), so
/// 32 bits hold them; the shared counters are 64-bit.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) received: [u32; 3],
    pub(super) sent: [u32; 3],
    pub(super) bytes_received: u64,
    /// Control packets by type nibble, received and sent.
    pub(super) packets_in: [u32; 16],
    pub(super) packets_out: [u32; 16],
}

impl Client {
    /// In a cluster: when the session has nothing queued and nothing in flight, records
    /// `position` (read by the caller *before* looking, see `cluster/anchors.rs`) as its
    /// drained position, and returns it.
    pub(super) fn drained(&self, position: u64) -> Option<u64> {
        if !(self.state.inflight.is_empty() && self.handle.outbox.is_empty()) {
            return None;
        }
        self.handle
            .drained_at
            .fetch_max(position, std::sync::atomic::Ordering::Release);
        Some(position)
    }

    /// Adds the per-connection tallies to the shared counters.
    pub(super) fn flush_tally(&mut self) {
        let m = &self.broker.metrics;
        let t = std::mem::take(&mut self.tally);
        for q in 0..3 {
            if t.received[q] > 0 {
                m.received[q].inc_by(u64::from(t.received[q]));
            }
            if t.sent[q] > 0 {
                m.sent[q].inc_by(u64::from(t.sent[q]));
            }
        }
        if t.bytes_received > 0 {
            m.bytes_received.inc_by(t.bytes_received);
        }
        for k in 0..16u8 {
            let (i, o) = (t.packets_in[usize::from(k)], t.packets_out[usize::from(k)]);
            if i > 0 {
                m.packets_received.add(k, u64::from(i));
            }
            if o > 0 {
                m.packets_sent.add(k, u64::from(o));
            }
        }
        self.handle.inflight.store(
            self.state.inflight.len(),
            std::sync::atomic::Ordering::Relaxed,
        );
        if let Some(peers) = self.broker.peers() {
            if self
                .handle
                .persistent
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                // The position first, then the queue: whatever was routed up to it is in the
                // queue or finished (`cluster/anchors.rs`).
                let _ = self.drained(peers.position());
            }
        }
    }
}
