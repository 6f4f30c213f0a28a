//! `storage.durability = "memory"`: nothing is written anywhere; the broker's own in-memory
//! structures (registry, outboxes, retained tree) are the only copy, and a restart loses them.
//! Commits complete immediately, which is exactly what this durability level promises.

use super::{Commit, Store, StoreOp};

pub struct MemoryStore;

impl Store for MemoryStore {
    fn commit(&self, _op: StoreOp<'_>) -> Commit {
        Commit::Done
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}
