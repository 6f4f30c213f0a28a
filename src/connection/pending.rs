//! Output that waits for a commit before it may go out, other than acknowledgements (those
//! queue in `responses.rs`): the QoS 2 write gate, and a connection's outstanding bookkeeping
//! submits.

use crate::storage::Commit;
use bytes::BytesMut;
use std::collections::VecDeque;
use std::time::Duration;

/// Holds back output that must not reach the client before a commit: a QoS 2 PUBLISH or
/// PUBREL of a stored message is sent only after its in-flight record (packet id, released)
/// is stored. Otherwise a broker killed in between would, after restart, re-send a message the
/// client already completed (a duplicate) or reuse a packet id the client still holds open
/// (a loss). Everything written after a gated packet waits too, keeping order.
#[derive(Default)]
pub(crate) struct Gate {
    /// Offset in the write buffer where held output begins.
    pub(crate) start: Option<usize>,
    /// Gated output was encoded since the last submit.
    pub(crate) needs_submit: bool,
    /// The submit that covers everything held (commits complete in order).
    pub(crate) commit: Option<tokio::sync::oneshot::Receiver<()>>,
    /// That commit failed: what is held can never go out, and the connection is closed
    /// (`Close::StorageFailed`).
    pub(crate) failed: bool,
}

impl Gate {
    /// Holds output from `offset` on until `commit` is done (a commit submitted by someone
    /// else than `flush_ops`, e.g. the session record CONNACK describes). Commits complete in
    /// submission order, so the newest one covers everything held.
    pub(crate) fn hold_commit(&mut self, offset: usize, commit: Option<Commit>) {
        match commit {
            None | Some(Commit::Done) => {}
            Some(Commit::Pending(rx)) => {
                self.hold_from(offset);
                self.needs_submit = false;
                self.commit = Some(rx);
            }
            Some(Commit::Failed) => {
                self.hold_from(offset);
                self.needs_submit = false;
                self.failed = true;
            }
        }
    }

    /// Call before encoding a packet that must wait for the next submit.
    pub(crate) fn hold_from(&mut self, offset: usize) {
        if self.start.is_none() {
            self.start = Some(offset);
        }
        self.needs_submit = true;
    }

    /// How much of a write buffer of `len` bytes may be written now.
    pub fn writable(&self, len: usize) -> usize {
        self.start.map_or(len, |s| s.min(len))
    }

    /// `n` bytes from the front of the write buffer were written.
    pub fn advanced(&mut self, n: usize) {
        if let Some(s) = &mut self.start {
            *s = s.saturating_sub(n);
        }
    }

    /// Whether output is held waiting for a submitted commit.
    pub fn waiting(&self) -> bool {
        self.commit.is_some()
    }

    /// The covering commit is done: what it covers may go. Unless more gated output came
    /// after it was submitted and waits for the next submit (`needs_submit`): the record
    /// that output depends on is not even submitted yet, so everything stays held until
    /// that next commit (found by the deterministic simulation: a PUBREL sent before its
    /// in-flight record was stored, so a crash brought the message back as new).
    fn release_held(&mut self) {
        if !self.needs_submit {
            self.start = None;
        }
    }

    /// Without waiting: if the covering commit is done, everything held may go. (A sans-IO
    /// driver calls this through `poll_output`; the tokio driver also awaits [`Gate::ready`].)
    pub fn poll(&mut self) {
        if let Some(rx) = &mut self.commit {
            match rx.try_recv() {
                Ok(()) => {
                    self.commit = None;
                    self.release_held();
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    self.commit = None;
                    self.failed = true;
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
            }
        }
    }

    /// Resolves when the covering commit is done; then everything held may go.
    pub async fn ready(&mut self) {
        if let Some(rx) = &mut self.commit {
            let ok = rx.await.is_ok();
            self.commit = None;
            if ok {
                self.release_held();
            } else {
                self.failed = true;
            }
        }
    }

    /// At close: waits briefly for the commit, else drops the held output.
    pub async fn settle(&mut self, wbuf: &mut BytesMut) {
        if self.commit.is_some() {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.ready()).await;
        }
        self.drop_held(wbuf);
    }

    /// Drops the held output (its commit did not come): it is never sent.
    pub(crate) fn drop_held(&mut self, wbuf: &mut BytesMut) {
        if let Some(s) = self.start.take() {
            wbuf.truncate(s);
        }
    }
}

/// Submits of a connection's bookkeeping ops still being written (see
/// `Client::ops_commit`). A few may be outstanding so delivery and storage overlap.
#[derive(Default)]
pub(crate) struct OpsCommit(pub(crate) VecDeque<tokio::sync::oneshot::Receiver<()>>);

/// Bookkeeping submits a connection may have outstanding before it stops delivering.
const OPS_IN_FLIGHT: usize = 4;

impl OpsCommit {
    pub(crate) fn push(&mut self, rx: tokio::sync::oneshot::Receiver<()>) {
        self.0.push_back(rx);
    }

    /// Whether delivering must wait for the store.
    pub fn waiting(&mut self) -> bool {
        while let Some(rx) = self.0.front_mut() {
            match rx.try_recv() {
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => break,
                _ => {
                    self.0.pop_front();
                }
            }
        }
        self.0.len() >= OPS_IN_FLIGHT
    }

    /// Resolves when the oldest outstanding submit is written.
    pub async fn ready(&mut self) {
        if let Some(rx) = self.0.front_mut() {
            let _ = rx.await;
            self.0.pop_front();
        }
    }
}
