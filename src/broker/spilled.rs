//! A persistent session's queue may be longer than its memory share: the tail lives only on
//! disk (the outbox's *spill*) and is loaded back in batches as the connection drains the
//! head, so a queue of millions costs memory for a batch, not for millions.

use super::Broker;
use crate::message::Message;
use crate::outbox::{Delivery, SubIds};
use crate::session::registry::SessionHandle;
use crate::storage::record::unix_now_ms;
use crate::storage::Op;
use std::sync::Arc;

impl Broker {
    /// Moves the next committed entries of `handle`'s on-disk queue into memory; returns
    /// whether anything was loaded. Dangling entries (their message is gone) are dequeued
    /// through `ops`. Synchronous: fjall reads are mostly served from its memtable and cache.
    pub fn load_spilled(&self, handle: &SessionHandle, ops: &mut Vec<Op>) -> bool {
        const LOAD_BATCH: usize = 256;
        if !self.store.durable() {
            return false;
        }
        let Some((from, below, epoch)) = handle.outbox.spill_window() else {
            return false;
        };
        let entries = match self.store.read_queue(handle.id, from, LOAD_BATCH) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(client_id = %handle.client_id, error = %e, "cannot read the session queue");
                return false;
            }
        };
        let full = entries.len() == LOAD_BATCH;
        let now = crate::clock::now();
        let unix = unix_now_ms();
        let mut loaded = Vec::with_capacity(entries.len());
        let mut missing = 0;
        let mut next_from = below;
        let entries: Vec<_> = entries
            .into_iter()
            .take_while(|(seq, _)| *seq < below)
            .collect();
        if let Some((last, _)) = entries.last() {
            next_from = last + 1;
        }
        // One pass over the batch's messages; should that fail, one read each as before (a
        // message that cannot be read is then dequeued, below).
        let ids: Vec<u64> = entries.iter().map(|(_, e)| e.msg_id).collect();
        let messages = self.store.get_messages(&ids).unwrap_or_else(|_| {
            ids.iter()
                .map(|&id| self.store.get_message(id).ok().flatten())
                .collect()
        });
        for ((seq, e), m) in entries.into_iter().zip(messages) {
            match m {
                Some(m) => {
                    let mut sub_ids = SubIds::None;
                    for id in e.sub_ids {
                        sub_ids.push(id);
                    }
                    let mut msg = m.to_message(now, unix);
                    // Its latency counts from its stored enqueue second (consumer lag).
                    msg.received = Message::received_from_unix(e.enqueued, now, unix);
                    let mut d = Delivery::new(Arc::new(msg), e.qos, e.retain, sub_ids);
                    d.seq = Some(seq);
                    d.stored = true;
                    d.enqueued = e.enqueued;
                    loaded.push(d);
                }
                None => {
                    missing += 1;
                    ops.push(Op::Dequeue {
                        session_id: handle.id,
                        seq,
                    });
                }
            }
        }
        if !full {
            next_from = below;
        }
        let any = !loaded.is_empty();
        handle.outbox.load_spilled(loaded, next_from, epoch);
        if missing > 0 {
            handle.outbox.forget_spilled(missing);
        }
        any
    }
}
