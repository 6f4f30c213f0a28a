//! The storage thread: group commit and message reference counting.
//!
//! The thread blocks for the first pending submit, then takes whatever else is already queued
//! (up to `MAX_GROUP_OPS`), and applies the group's ops to an in-memory overlay of pending
//! writes. Ops that must know what they replace or delete (a dequeued entry's message id, the
//! message of a replaced retained topic) read the overlay first, then fjall; since this thread
//! is fjall's only writer, overlay + fjall is the exact current state. The overlay then becomes
//! one atomic fjall batch, committed and persisted once, and only then are the group's
//! receivers resolved. The overlay also collapses writes to one key within a group (a message
//! enqueued and dequeued in the same group costs a tombstone, not two records).
//!
//! A Dequeue must read the entry it removes (its message id, for the reference count; and
//! whether it is there at all, so a second Dequeue of it changes nothing). A connection
//! draining a stored queue sends hundreds of Dequeues of neighbouring seqs per group, and a
//! point read each, walking fjall's tables down again, was nearly half of this thread's time
//! (perf, durable-q1-os drain). So before applying a group, the entries its Dequeues name are
//! read ahead with one range pass per session when their seqs are close (`worth_a_range`), into
//! `prefetched`. That is exact: until the group's batch is committed this thread is the only
//! writer, so fjall's state cannot change under the read-ahead, and the overlay (the group's
//! own earlier writes) is still consulted first.

use super::recover::{NEXT_MESSAGE_KEY, NEXT_SESSION_KEY};
use super::{keys, worth_a_range, Keyspaces, Op, Request, Stats, StorageError, MAX_GROUP_OPS};
use crate::storage::record::{
    decode_msg_ref, encode_msg_ref, InflightRecord, QueueEntry, SessionRecord,
};
use fjall::{Database, Keyspace, PersistMode};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

/// The keyspaces the overlay covers (all but `meta`).
#[derive(Debug, Clone, Copy)]
enum Ks {
    Messages,
    Sessions,
    Subs,
    Queue,
    Inflight,
    Qos2,
    Retained,
}

const KS_COUNT: usize = 7;

/// Pending writes of the current group, per keyspace: `Some(value)` inserts, `None` removes.
type Overlay = [BTreeMap<Vec<u8>, Option<Vec<u8>>>; KS_COUNT];

pub(super) struct Writer {
    db: Database,
    ks: Keyspaces,
    mode: PersistMode,
    path: PathBuf,
    /// References to each message (queue entries, in-flight records, retained topics).
    refs: HashMap<u64, u32>,
    overlay: Overlay,
    /// Queue entries the current group's Dequeues name, read ahead from fjall (`None`: not
    /// stored). Holds at most one group's worth (`MAX_GROUP_OPS`).
    prefetched: HashMap<[u8; 16], Option<Vec<u8>>>,
    /// Messages put or dereferenced in the current submit, checked for zero at its end.
    touched: Vec<u64>,
    /// Next message and session ids above everything written, and whether the current
    /// group raised them (then they are written to `meta` with it).
    next_message_id: u64,
    next_session_id: u64,
    marks_dirty: bool,
    stats: Arc<Stats>,
    /// Set after a failed commit: the in-memory counts no longer match the disk, so the
    /// thread refuses everything after it instead of writing wrong deletions.
    failed: bool,
}

impl Writer {
    pub(super) fn new(
        db: Database,
        ks: Keyspaces,
        mode: PersistMode,
        path: PathBuf,
        refs: HashMap<u64, u32>,
        (next_message_id, next_session_id): (u64, u64),
        stats: Arc<Stats>,
    ) -> Writer {
        Writer {
            db,
            ks,
            mode,
            path,
            refs,
            overlay: Default::default(),
            prefetched: HashMap::new(),
            touched: Vec::new(),
            next_message_id,
            next_session_id,
            marks_dirty: false,
            stats,
            failed: false,
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut n = first.ops.len();
            let mut group = vec![first];
            while n < MAX_GROUP_OPS {
                match rx.try_recv() {
                    Ok(r) => {
                        n += r.ops.len();
                        group.push(r);
                    }
                    Err(_) => break,
                }
            }
            if self.failed {
                // Dropping the senders tells each submitter its ops were not stored.
                continue;
            }
            let mut waiters = Vec::with_capacity(group.len());
            let started = std::time::Instant::now();
            let result = (|| {
                self.prefetch_dequeues(&group)?;
                for req in group {
                    let ops = req.ops.len() as u64;
                    self.apply_submit(req.ops)?;
                    self.stats.ops.fetch_add(ops, Ordering::Relaxed);
                    waiters.push((req.done, req.then));
                }
                self.commit()
            })();
            self.prefetched.clear();
            match result {
                Ok(()) => {
                    self.stats
                        .submits
                        .fetch_add(waiters.len() as u64, Ordering::Relaxed);
                    if let Some(o) = self.stats.observer.get() {
                        o.observe(
                            waiters.len(),
                            n,
                            started.elapsed(),
                            self.mode != PersistMode::Buffer,
                        );
                    }
                    for (done, then) in waiters {
                        // Effects first (in submission order), so whatever the submitter
                        // acknowledges on `done` is already visible to its subscribers; they
                        // run whether or not the submitter is still there to wait.
                        then.run(crate::storage::Outcome::Durable);
                        // The submitter may have stopped waiting; nothing to do then.
                        let _ = done.send(());
                    }
                }
                Err(e) => {
                    // Dropping `waiters` runs their effects as failed (reservations released).
                    drop(waiters);
                    self.overlay = Default::default();
                    self.touched.clear();
                    tracing::error!(error = %e,
                        "storage commit failed; no further writes will be acknowledged");
                    self.failed = true;
                }
            }
        }
        // Channel closed: everything submitted is committed. Make it durable against power
        // loss as well, whatever the mode, since shutdown is rare.
        if !self.failed {
            if let Err(e) = self.db.persist(PersistMode::SyncAll) {
                tracing::error!(path = %self.path.display(), error = %e,
                    "storage sync at shutdown failed");
            }
        }
    }

    fn keyspace(&self, k: Ks) -> &Keyspace {
        match k {
            Ks::Messages => &self.ks.messages,
            Ks::Sessions => &self.ks.sessions,
            Ks::Subs => &self.ks.subs,
            Ks::Queue => &self.ks.queue,
            Ks::Inflight => &self.ks.inflight,
            Ks::Qos2 => &self.ks.qos2,
            Ks::Retained => &self.ks.retained,
        }
    }

    fn get(&mut self, k: Ks, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(pending) = self.overlay[k as usize].get(key) {
            return Ok(pending.clone());
        }
        // Taken, not copied: a key read again in this group is answered by the overlay (its
        // Dequeue deleted it) or, if it was absent, by fjall, which still agrees.
        if let (Ks::Queue, Ok(key)) = (k, <&[u8; 16]>::try_from(key)) {
            if let Some(read_ahead) = self.prefetched.remove(key) {
                return Ok(read_ahead);
            }
        }
        Ok(self
            .keyspace(k)
            .get(key)
            .map_err(StorageError::fjall(&self.path))?
            .map(|v| v.to_vec()))
    }

    /// Reads ahead the queue entries the group's Dequeues name (see the module doc): per
    /// session, one pass over the range from the lowest to the highest seq when that is
    /// `worth_a_range`; sparse ones are left to point reads.
    fn prefetch_dequeues(&mut self, group: &[Request]) -> Result<(), StorageError> {
        let mut by_session: HashMap<u64, Vec<u64>> = HashMap::new();
        for req in group {
            for op in &req.ops {
                if let Op::Dequeue { session_id, seq } = op {
                    by_session.entry(*session_id).or_default().push(*seq);
                }
            }
        }
        for (session_id, mut seqs) in by_session {
            seqs.sort_unstable();
            seqs.dedup();
            let (Some(&lo), Some(&hi)) = (seqs.first(), seqs.last()) else {
                continue;
            };
            if !worth_a_range(lo, hi, seqs.len()) {
                continue;
            }
            for &seq in &seqs {
                self.prefetched.insert(keys::queue(session_id, seq), None);
            }
            let range = keys::queue(session_id, lo)..=keys::queue(session_id, hi);
            for guard in self.ks.queue.range(range) {
                let (key, v) = guard
                    .into_inner()
                    .map_err(StorageError::fjall(&self.path))?;
                if let Ok(key) = <[u8; 16]>::try_from(&*key) {
                    if let Some(slot) = self.prefetched.get_mut(&key) {
                        *slot = Some(v.to_vec());
                    }
                }
            }
        }
        Ok(())
    }

    /// Keys (and values) under `prefix` as they stand with the pending writes applied.
    fn scan_prefix(
        &self,
        k: Ks,
        prefix: &[u8],
    ) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, StorageError> {
        let mut found = BTreeMap::new();
        for g in self.keyspace(k).prefix(prefix) {
            let (key, v) = g.into_inner().map_err(StorageError::fjall(&self.path))?;
            found.insert(key.to_vec(), v.to_vec());
        }
        let pending = self.overlay[k as usize]
            .range(prefix.to_vec()..)
            .take_while(|(key, _)| key.starts_with(prefix));
        for (key, v) in pending {
            match v {
                Some(v) => found.insert(key.clone(), v.clone()),
                None => found.remove(key),
            };
        }
        Ok(found)
    }

    fn put(&mut self, k: Ks, key: impl Into<Vec<u8>>, v: Vec<u8>) {
        self.overlay[k as usize].insert(key.into(), Some(v));
    }

    fn del(&mut self, k: Ks, key: impl Into<Vec<u8>>) {
        self.overlay[k as usize].insert(key.into(), None);
    }

    // Reference counts: `refs` holds only counts other than 1 (0 while a submit is being
    // applied, or 2 and more for fan-out). A stored message absent from it has exactly one
    // reference — the common case of one queue entry or in-flight record — so a million
    // queued messages cost no bookkeeping in memory.

    fn add_ref(&mut self, id: u64) {
        match self.refs.get_mut(&id) {
            Some(n) => {
                *n += 1;
                if *n == 1 {
                    self.refs.remove(&id);
                }
            }
            None => {
                self.refs.insert(id, 2);
            }
        }
    }

    fn drop_ref(&mut self, id: u64) {
        match self.refs.get_mut(&id) {
            Some(n) => {
                *n = n.saturating_sub(1);
                if *n == 1 {
                    self.refs.remove(&id);
                } else if *n == 0 {
                    self.touched.push(id);
                }
            }
            None => {
                self.refs.insert(id, 0);
                self.touched.push(id);
            }
        }
    }

    fn decode_err(
        &self,
        what: &str,
        key: &[u8],
        e: crate::storage::record::DecodeError,
    ) -> StorageError {
        StorageError::decode(&self.path, what, key, e)
    }

    /// Removes the queue entry at `key` if present, dropping its message reference.
    fn remove_queue_entry(&mut self, key: &[u8]) -> Result<(), StorageError> {
        if let Some(v) = self.get(Ks::Queue, key)? {
            let e = QueueEntry::decode(&v).map_err(|e| self.decode_err("queue entry", key, e))?;
            self.drop_ref(e.msg_id);
            self.del(Ks::Queue, key);
        }
        Ok(())
    }

    fn remove_inflight(&mut self, key: &[u8]) -> Result<(), StorageError> {
        if let Some(v) = self.get(Ks::Inflight, key)? {
            let r = InflightRecord::decode(&v)
                .map_err(|e| self.decode_err("inflight record", key, e))?;
            self.drop_ref(r.entry.msg_id);
            self.del(Ks::Inflight, key);
        }
        Ok(())
    }

    fn remove_retained(&mut self, key: &[u8]) -> Result<(), StorageError> {
        if let Some(v) = self.get(Ks::Retained, key)? {
            let id = decode_msg_ref(&v).map_err(|e| self.decode_err("retained", key, e))?;
            self.drop_ref(id);
            self.del(Ks::Retained, key);
        }
        Ok(())
    }

    /// Applies one submit's ops to the overlay, then deletes the messages it left without
    /// references.
    fn apply_submit(&mut self, ops: Vec<Op>) -> Result<(), StorageError> {
        for op in ops {
            self.apply(op)?;
        }
        for id in std::mem::take(&mut self.touched) {
            if self.refs.get(&id) == Some(&0) {
                self.refs.remove(&id);
                self.del(Ks::Messages, keys::message(id));
            }
        }
        Ok(())
    }

    fn saw_message(&mut self, id: u64) {
        if id >= self.next_message_id {
            self.next_message_id = id.saturating_add(1);
            self.marks_dirty = true;
        }
    }

    fn saw_session(&mut self, id: u64) {
        if id >= self.next_session_id {
            self.next_session_id = id.saturating_add(1);
            self.marks_dirty = true;
        }
    }

    fn apply(&mut self, op: Op) -> Result<(), StorageError> {
        match &op {
            Op::PutMessage(m) => self.saw_message(m.id),
            Op::PutSession(s) => self.saw_session(s.session_id),
            Op::Enqueue { session_id, .. }
            | Op::PutInflight { session_id, .. }
            | Op::PutQos2 { session_id, .. } => self.saw_session(*session_id),
            _ => {}
        }
        match op {
            Op::PutMessage(m) => {
                // Unreferenced until an op of this submit refers to it.
                self.refs.insert(m.id, 0);
                self.touched.push(m.id);
                self.put(Ks::Messages, keys::message(m.id), m.encode());
            }
            Op::PutSession(s) => self.put(Ks::Sessions, s.client_id.as_bytes(), s.encode()),
            Op::DeleteSession {
                client_id,
                session_id,
            } => {
                let current = match self.get(Ks::Sessions, client_id.as_bytes())? {
                    None => None,
                    Some(v) => Some(
                        SessionRecord::decode(&v)
                            .map_err(|e| self.decode_err("session", client_id.as_bytes(), e))?
                            .session_id,
                    ),
                };
                // A newer session of the same client (takeover) keeps its record and
                // subscriptions; only the old session's own state goes.
                if current.is_none_or(|id| id == session_id) {
                    self.del(Ks::Sessions, client_id.as_bytes());
                    for key in self
                        .scan_prefix(Ks::Subs, &keys::sub_prefix(&client_id))?
                        .into_keys()
                    {
                        self.del(Ks::Subs, key);
                    }
                }
                let prefix = keys::session_prefix(session_id);
                for (key, v) in self.scan_prefix(Ks::Queue, &prefix)? {
                    let e = QueueEntry::decode(&v)
                        .map_err(|e| self.decode_err("queue entry", &key, e))?;
                    self.drop_ref(e.msg_id);
                    self.del(Ks::Queue, key);
                }
                for (key, v) in self.scan_prefix(Ks::Inflight, &prefix)? {
                    let r = InflightRecord::decode(&v)
                        .map_err(|e| self.decode_err("inflight record", &key, e))?;
                    self.drop_ref(r.entry.msg_id);
                    self.del(Ks::Inflight, key);
                }
                for key in self.scan_prefix(Ks::Qos2, &prefix)?.into_keys() {
                    self.del(Ks::Qos2, key);
                }
            }
            Op::PutSubscription { client_id, sub } => {
                self.put(Ks::Subs, keys::sub(&client_id, &sub.filter), sub.encode());
            }
            Op::DeleteSubscription { client_id, filter } => {
                self.del(Ks::Subs, keys::sub(&client_id, &filter));
            }
            Op::Enqueue {
                session_id,
                seq,
                entry,
            } => {
                // No read of what the key held: it holds nothing. A queue's seqs only grow
                // (the outbox allocates them, and after a restart continues above the highest
                // one stored), so an Enqueue never meets an entry; looking (a point read that
                // misses through every table) was a quarter of the storage thread's time.
                self.add_ref(entry.msg_id);
                self.put(Ks::Queue, keys::queue(session_id, seq), entry.encode());
            }
            Op::Dequeue { session_id, seq } => {
                self.remove_queue_entry(&keys::queue(session_id, seq))?;
            }
            Op::PutInflight { session_id, rec } => {
                let key = keys::packet(session_id, rec.packet_id);
                self.add_ref(rec.entry.msg_id);
                if rec.released {
                    // A QoS 2 delivery's record turning "released" replaces the record of the
                    // same message at this key (or is its first record, for a message sent
                    // without one): look, so the reference is counted once either way.
                    self.remove_inflight(&key)?;
                }
                // A record for a new delivery meets no record at its key: the connection
                // takes a packet id only when no delivery of the session holds it, and the
                // record of the last one to hold it was deleted (DeleteInflight, in an
                // earlier or the same submit) when it finished. Looking would be a point read
                // that misses through every table, once per message delivered from a stored
                // queue. Were that ever wrong, the record it replaced would leave its message
                // one reference too many (kept on disk, never lost), and recovery, which
                // counts references afresh, deletes it at the next start.
                self.put(Ks::Inflight, key, rec.encode());
            }
            Op::DeleteInflight {
                session_id,
                packet_id,
            } => self.remove_inflight(&keys::packet(session_id, packet_id))?,
            Op::PutQos2 {
                session_id,
                packet_id,
            } => self.put(Ks::Qos2, keys::packet(session_id, packet_id), Vec::new()),
            Op::DeleteQos2 {
                session_id,
                packet_id,
            } => self.del(Ks::Qos2, keys::packet(session_id, packet_id)),
            Op::PutRetained { topic, msg_id } => {
                self.add_ref(msg_id);
                self.remove_retained(topic.as_bytes())?;
                self.put(Ks::Retained, topic.into_bytes(), encode_msg_ref(msg_id));
            }
            Op::DeleteRetained { topic } => self.remove_retained(topic.as_bytes())?,
            Op::PurgeQueue { session_id, below } => {
                let prefix = keys::session_prefix(session_id);
                for (key, v) in self.scan_prefix(Ks::Queue, &prefix)? {
                    let seq = key
                        .get(8..16)
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        .map_or(u64::MAX, u64::from_be_bytes);
                    if seq >= below {
                        continue;
                    }
                    let e = QueueEntry::decode(&v)
                        .map_err(|e| self.decode_err("queue entry", &key, e))?;
                    self.drop_ref(e.msg_id);
                    self.del(Ks::Queue, key);
                }
            }
        }
        Ok(())
    }

    /// Writes the overlay as one atomic batch and persists it per the durability mode.
    fn commit(&mut self) -> Result<(), StorageError> {
        let overlay = std::mem::take(&mut self.overlay);
        let items: usize = overlay.iter().map(BTreeMap::len).sum();
        let marks = std::mem::take(&mut self.marks_dirty);
        if items == 0 && !marks {
            // Nothing new: earlier groups were persisted before their receivers resolved.
            return Ok(());
        }
        let mut batch = self.db.batch().durability(Some(self.mode));
        let order = [
            Ks::Messages,
            Ks::Sessions,
            Ks::Subs,
            Ks::Queue,
            Ks::Inflight,
            Ks::Qos2,
            Ks::Retained,
        ];
        for (k, pending) in order.into_iter().zip(overlay) {
            let ks = self.keyspace(k).clone();
            for (key, v) in pending {
                match v {
                    Some(v) => batch.insert(&ks, key, v),
                    None => batch.remove(&ks, key),
                }
            }
        }
        if marks {
            let meta = &self.ks.meta;
            batch.insert(meta, NEXT_MESSAGE_KEY, self.next_message_id.to_be_bytes());
            batch.insert(meta, NEXT_SESSION_KEY, self.next_session_id.to_be_bytes());
        }
        batch.commit().map_err(StorageError::fjall(&self.path))?;
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if self.mode != PersistMode::Buffer {
            self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}
