//! `storage.durability = "memory"`: nothing is written anywhere; the broker's own in-memory
//! structures (registry, outboxes, retained tree) are the only copy, and a restart loses them.
//! Commits complete immediately, which is exactly what this durability level promises.

use super::record::{QueueEntry, StoredMessage};
use super::{Commit, OnCommit, Op, Outcome, StorageError, Store};

pub struct MemoryStore;

impl Store for MemoryStore {
    fn durable(&self) -> bool {
        false
    }
    fn submit_then(&self, _ops: Vec<Op>, then: OnCommit) -> Commit {
        then.run(Outcome::Durable);
        Commit::Done
    }
    fn read_queue(&self, _: u64, _: u64, _: usize) -> Result<Vec<(u64, QueueEntry)>, StorageError> {
        Ok(Vec::new())
    }
    fn get_message(&self, _: u64) -> Result<Option<StoredMessage>, StorageError> {
        Ok(None)
    }
    fn close(&self) {}
    fn name(&self) -> &'static str {
        "memory"
    }
}
