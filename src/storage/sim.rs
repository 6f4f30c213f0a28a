//! The store as the deterministic simulation sees it (`src/connection/sim.rs`): the real
//! durable store (fjall in a temporary directory, so a simulated restart recovers exactly
//! what a real one would), behind a gate the simulation controls. Submits wait in the gate
//! until the simulation completes them, in submission order as the real storage thread does,
//! or fails them; a simulated crash loses whatever was still waiting.
//!
//! Completing a submit forwards it to the real store and waits for that commit, then runs its
//! effects and resolves its receiver — the same contract as the storage thread: effects run
//! in submission order, before the submitter hears of it, whatever became of the submitter.
//! After a failure, like the real store, nothing more is accepted.

use super::durable::{DurableMode, DurableStore, Op, Recovered, StorageError};
use super::record::{QueueEntry, StoredMessage};
use super::{Commit, OnCommit, Outcome, Store};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use tokio::sync::oneshot;

struct Waiting {
    ops: Vec<Op>,
    then: OnCommit,
    done: oneshot::Sender<()>,
}

pub struct SimStore {
    /// None once crashed: the real store is closed and dropped, releasing its directory for
    /// the restarted broker.
    inner: Mutex<Option<DurableStore>>,
    waiting: Mutex<VecDeque<Waiting>>,
    failed: AtomicBool,
    /// Set by a simulated crash: this instance is dead, whatever still reaches it is lost.
    crashed: AtomicBool,
}

impl SimStore {
    pub fn open(dir: &Path) -> Result<(SimStore, Recovered), StorageError> {
        let (inner, recovered) = DurableStore::open(dir, DurableMode::Os)?;
        Ok((
            SimStore {
                inner: Mutex::new(Some(inner)),
                waiting: Mutex::new(VecDeque::new()),
                failed: AtomicBool::new(false),
                crashed: AtomicBool::new(false),
            },
            recovered,
        ))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiting>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Submits waiting for completion.
    pub fn waiting(&self) -> usize {
        self.queue().len()
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Commits the oldest `n` waiting submits, in order; returns how many it committed.
    pub fn complete(&self, n: usize) -> usize {
        let mut done = 0;
        while done < n {
            let Some(w) = self.queue().pop_front() else {
                break;
            };
            // The real store's own effect tells us when its commit is durable (a std channel:
            // this runs inside the simulation's runtime, where tokio's blocking receive is
            // not allowed).
            let (tx, rx) = std::sync::mpsc::channel();
            if let Some(inner) = self.inner().as_ref() {
                // Its own receiver is not needed: the effect reports the outcome.
                drop(inner.submit_then(
                    w.ops,
                    OnCommit::new(move |o| {
                        let _ = tx.send(o);
                    }),
                ));
            }
            match rx.recv() {
                Ok(Outcome::Durable) => {
                    w.then.run(Outcome::Durable);
                    let _ = w.done.send(());
                }
                _ => {
                    self.failed.store(true, Ordering::Relaxed);
                    w.then.run(Outcome::Failed);
                }
            }
            done += 1;
        }
        done
    }

    /// Fails the oldest waiting submit and, like the real store after a failed commit, every
    /// later one: their effects run as failed, their submitters are told.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
        let all: Vec<Waiting> = self.queue().drain(..).collect();
        for w in all {
            w.then.run(Outcome::Failed);
        }
    }

    /// A crash: what waits is lost (its effects never run: the broker that held them is gone),
    /// and the real store is closed with only what was completed.
    pub fn crash(&self) {
        self.crashed.store(true, Ordering::Relaxed);
        let all: Vec<Waiting> = self.queue().drain(..).collect();
        for w in all {
            // Not Failed: a crashed broker runs nothing.
            w.then.discard();
        }
        if let Some(inner) = self.inner().take() {
            inner.close();
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Option<DurableStore>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Store for SimStore {
    fn durable(&self) -> bool {
        true
    }

    fn submit_then(&self, ops: Vec<Op>, then: OnCommit) -> Commit {
        if self.crashed.load(Ordering::Relaxed) {
            then.discard();
            return Commit::Failed;
        }
        if self.failed.load(Ordering::Relaxed) {
            // As the real store answers after a failure: a receiver that reports the failure.
            then.run(Outcome::Failed);
            let (_, rx) = oneshot::channel();
            return Commit::Pending(rx);
        }
        let (done, rx) = oneshot::channel();
        self.queue().push_back(Waiting { ops, then, done });
        Commit::Pending(rx)
    }

    fn read_queue(
        &self,
        session_id: u64,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, QueueEntry)>, StorageError> {
        match self.inner().as_ref() {
            Some(inner) => inner.read_queue(session_id, from_seq, limit),
            None => Ok(Vec::new()),
        }
    }

    fn get_message(&self, id: u64) -> Result<Option<StoredMessage>, StorageError> {
        match self.inner().as_ref() {
            Some(inner) => inner.get_message(id),
            None => Ok(None),
        }
    }

    fn close(&self) {
        self.complete(usize::MAX);
        if let Some(inner) = self.inner().as_ref() {
            inner.close();
        }
    }

    fn name(&self) -> &'static str {
        "sim"
    }
}
