//! Where acknowledged state is made durable, behind one trait.
//!
//! Every PUBACK, PUBREC and SUBACK the broker sends is released by the completion of the
//! commit that covers it, in the order the packets arrived — never inline. With the in-memory
//! store a commit completes at once (the state it covers lives only in the broker's own
//! structures); with the durable store it completes when the storage thread's group commit
//! that contains it has been written (`os`) or synced (`fsync`).
//!
//! What must follow a commit (a stored delivery becoming visible in a subscriber's queue)
//! travels *with* the commit as an [`OnCommit`], and the store runs it: when the commit is
//! durable, before the submitter's receiver resolves, or with [`Outcome::Failed`] when it
//! is not. It never rides with the submitting connection, which may vanish mid-commit (a
//! device resetting its link) and would take the effect with it: issue 13's stalled queues.

mod codec;
pub mod durable;
mod memory;
pub mod record;
#[cfg(test)]
pub mod sim;

pub use durable::{CommitObserver, DurableMode, DurableStore, Op, Recovered, StorageError};
pub use memory::MemoryStore;

use crate::config::{Durability, StorageConfig};
use record::{QueueEntry, StoredMessage};
use std::sync::Arc;
use tokio::sync::oneshot;

/// How a commit ended, for its [`OnCommit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// As durable as the store promises.
    Durable,
    /// Not stored (I/O error, disk full, store closed): nothing it carried may be
    /// acknowledged, and what was reserved for it is given back.
    Failed,
}

/// Effects of a commit, run by the store exactly once: with [`Outcome::Durable`] when the
/// commit is done (in submission order, before the submitter's receiver resolves), or with
/// [`Outcome::Failed`]. Dropping one that never ran runs it as failed, so a request lost on
/// any path (a closed store, a dead storage thread, a refused group) still releases what it
/// held: effects cannot leak.
pub struct OnCommit(Option<Box<dyn FnOnce(Outcome) + Send>>);

impl OnCommit {
    pub fn new(f: impl FnOnce(Outcome) + Send + 'static) -> OnCommit {
        OnCommit(Some(Box::new(f)))
    }

    /// No effect (bookkeeping submits).
    pub fn none() -> OnCommit {
        OnCommit(None)
    }

    /// Drops the effect without running it (a simulated crash: the broker that would have
    /// run it is gone).
    #[cfg(test)]
    pub fn discard(mut self) {
        drop(self.0.take());
    }

    pub fn run(mut self, outcome: Outcome) {
        if let Some(f) = self.0.take() {
            f(outcome);
        }
    }
}

impl Drop for OnCommit {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Outcome::Failed);
        }
    }
}

impl std::fmt::Debug for OnCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "OnCommit(..)"
        } else {
            "OnCommit(none)"
        })
    }
}

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

impl Commit {
    /// Done when both are; failed when either fails (a task waits for the pair).
    pub fn both(a: Commit, b: Commit) -> Commit {
        async fn wait(c: Commit) -> bool {
            match c {
                Commit::Done => true,
                Commit::Failed => false,
                Commit::Pending(rx) => rx.await.is_ok(),
            }
        }
        match (a, b) {
            (Commit::Failed, _) | (_, Commit::Failed) => Commit::Failed,
            (Commit::Done, c) | (c, Commit::Done) => c,
            (a, b) => {
                let (tx, rx) = oneshot::channel();
                tokio::spawn(async move {
                    let (a, b) = tokio::join!(wait(a), wait(b));
                    if a && b {
                        let _ = tx.send(());
                    }
                });
                Commit::Pending(rx)
            }
        }
    }
}

pub trait Store: Send + Sync + 'static {
    /// Whether anything is written at all (`false` for `durability = "memory"`): callers skip
    /// building operations nobody would keep.
    fn durable(&self) -> bool;
    /// Submits changes, applied atomically and in submission order; `then` runs when they
    /// are durable (or failed), in submission order, whatever became of the submitter.
    fn submit_then(&self, ops: Vec<Op>, then: OnCommit) -> Commit;
    /// Submits changes with no effect attached.
    fn submit(&self, ops: Vec<Op>) -> Commit {
        self.submit_then(ops, OnCommit::none())
    }
    /// Queue entries of a session from `from_seq` on, ascending.
    fn read_queue(
        &self,
        session_id: u64,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, QueueEntry)>, StorageError>;
    fn get_message(&self, id: u64) -> Result<Option<StoredMessage>, StorageError>;
    /// The messages of `ids`, in the same order (`None`: not stored). A queue's batch names
    /// messages with close ids; a store may read them in one pass instead of one by one.
    fn get_messages(&self, ids: &[u64]) -> Result<Vec<Option<StoredMessage>>, StorageError> {
        ids.iter().map(|&id| self.get_message(id)).collect()
    }
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
    fn submit_then(&self, ops: Vec<Op>, then: OnCommit) -> Commit {
        Commit::Pending(DurableStore::submit_then(self, ops, then))
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
    fn get_messages(&self, ids: &[u64]) -> Result<Vec<Option<StoredMessage>>, StorageError> {
        DurableStore::get_messages(self, ids)
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
