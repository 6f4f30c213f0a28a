//! Where acknowledged state is made durable, behind one trait.
//!
//! Every PUBACK, PUBREC and SUBACK the broker sends is released by the completion of the
//! commit that covers it, in the order the packets arrived — never inline. With the in-memory
//! store a commit completes at once (the state it covers lives only in the broker's own
//! structures); with the durable store it completes when the storage thread's group commit
//! that contains it has been written (`os`) or synced (`fsync`).

pub mod durable;
mod memory;
pub mod record;

pub use durable::{CommitObserver, DurableMode, DurableStore, Op, Recovered, StorageError};
pub use memory::MemoryStore;

use crate::config::{Durability, StorageConfig};
use record::{QueueEntry, StoredMessage};
use std::sync::Arc;
use tokio::sync::oneshot;

/// Completion of a commit.
#[derive(Debug)]
pub enum Commit {
    /// Already as durable as promised.
    Done,
    /// Resolves when the commit is done; a closed channel means the store failed and the
    /// connection must not acknowledge.
    Pending(oneshot::Receiver<()>),
    /// The store failed to keep it.
    Failed,
}

pub trait Store: Send + Sync + 'static {
    /// Whether anything is written at all (`false` for `durability = "memory"`): callers skip
    /// building operations nobody would keep.
    fn durable(&self) -> bool;
    /// Submits changes, applied atomically and in submission order.
    fn submit(&self, ops: Vec<Op>) -> Commit;
    /// Queue entries of a session from `from_seq` on, ascending.
    fn read_queue(
        &self,
        session_id: u64,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, QueueEntry)>, StorageError>;
    fn get_message(&self, id: u64) -> Result<Option<StoredMessage>, StorageError>;
    /// Flushes and stops the store (at shutdown).
    fn close(&self);
    fn name(&self) -> &'static str;
    /// Installs the metrics observer of group commits (nothing to observe in memory).
    fn set_observer(&self, _observer: Box<dyn CommitObserver>) {}
}

impl Store for DurableStore {
    fn durable(&self) -> bool {
        true
    }
    fn submit(&self, ops: Vec<Op>) -> Commit {
        Commit::Pending(DurableStore::submit(self, ops))
    }
    fn read_queue(
        &self,
        session_id: u64,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, QueueEntry)>, StorageError> {
        DurableStore::read_queue(self, session_id, from_seq, limit)
    }
    fn get_message(&self, id: u64) -> Result<Option<StoredMessage>, StorageError> {
        DurableStore::get_message(self, id)
    }
    fn close(&self) {
        DurableStore::close(self)
    }
    fn name(&self) -> &'static str {
        "fjall"
    }
    fn set_observer(&self, observer: Box<dyn CommitObserver>) {
        DurableStore::set_observer(self, observer)
    }
}

/// Opens the store the configuration asks for, with what it recovered.
pub fn open(config: &StorageConfig) -> Result<(Arc<dyn Store>, Recovered), StorageError> {
    let mode = match config.durability {
        Durability::Memory => return Ok((Arc::new(MemoryStore), Recovered::default())),
        Durability::Os => DurableMode::Os,
        Durability::Fsync => DurableMode::Fsync,
    };
    let (store, recovered) = DurableStore::open(&config.dir, mode)?;
    Ok((Arc::new(store), recovered))
}
