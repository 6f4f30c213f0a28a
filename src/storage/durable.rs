//! The durable store: sessions, subscriptions, queues, in-flight state and retained messages
//! in an embedded [fjall](https://docs.rs/fjall) database in one directory.
//!
//! Each message is stored once, under its id, however many sessions hold it; queues,
//! in-flight records and retained topics refer to it by id, and a reference count kept by the
//! storage thread deletes it with its last reference (in the same atomic batch).
//!
//! fjall's API blocks on I/O, so every write goes through one dedicated storage thread:
//! [`DurableStore::submit`] only sends the ops there. The thread takes everything that queued
//! up while it was busy, applies it as one fjall write batch and persists once (group commit),
//! then resolves each submitter's receiver. Under load many connections therefore share one
//! `write` + one `fdatasync` instead of paying for their own. Reads ([`DurableStore::read_queue`],
//! [`DurableStore::get_message`]) go straight to fjall from the caller's thread: a batch is
//! applied to fjall's memtables before any receiver of it resolves, so a read after a resolved
//! submit sees its writes.
//!
//! Key layout (all integers big-endian so that byte order is numeric order):
//!
//! | keyspace   | key                          | value                       |
//! |------------|------------------------------|-----------------------------|
//! | `meta`     | `format`                     | [`STORE_FORMAT`] (one byte)  |
//! | `meta`     | `next_message_id`, `next_session_id` | u64 high-water marks |
//! | `messages` | message id (u64)             | [`StoredMessage`]           |
//! | `sessions` | client id                    | [`SessionRecord`]           |
//! | `subs`     | client id, 0x00, filter      | [`SubscriptionRecord`]      |
//! | `queue`    | session id (u64), seq (u64)  | [`QueueEntry`]              |
//! | `inflight` | session id (u64), packet id (u16) | [`InflightRecord`]     |
//! | `qos2`     | session id (u64), packet id (u16) | empty                  |
//! | `retained` | topic                        | message id reference        |
//!
//! A client id never contains 0x00 (MQTT strings exclude U+0000), so `client id + 0x00` is an
//! unambiguous prefix for one client's subscriptions.

mod recover;
#[cfg(test)]
mod stress_tests;
#[cfg(test)]
mod tests;
mod writer;

use super::record::{
    DecodeError, InflightRecord, QueueEntry, SessionRecord, StoredMessage, SubscriptionRecord,
};
use fjall::config::PinningPolicy;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// Version of the key layout and meta data, stored in `meta`/`format`. A store with a larger
/// number was written by a newer Tern and is refused rather than misread.
pub const STORE_FORMAT: u8 = 1;

/// fjall's block cache. Tern reads back little (queues of offline sessions, in-flight state at
/// startup); the memtables hold recent writes anyway.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Table files fjall keeps open (its descriptor cache; fjall's default is 900 on Linux).
/// Besides these, fjall holds the active journal, the lock file and, briefly, files being
/// flushed or compacted: a store needs roughly this many plus 5-10 descriptors, which must
/// fit next to the broker's client sockets under `RLIMIT_NOFILE`.
pub const MAX_CACHED_FILES: usize = 64;

/// File beside fjall's own, written when a store is created.
const MARKER_FILE: &str = "TERN_STORE";

/// Largest memtable per keyspace before it is flushed to a table file.
const MEMTABLE_BYTES: u64 = 8 * 1024 * 1024;

/// Journal size after which fjall flushes memtables so old journals can be deleted (its
/// minimum; the default of 512 MiB would hold that much disk for an idle broker).
const JOURNAL_BYTES: u64 = 64 * 1024 * 1024;

/// fjall's background threads (memtable flushes and compactions). fjall 3.1 defaults to one
/// per CPU (up to 4), and with more than one its worker 0 hands every compaction request back
/// to the queue for another worker and takes it again at once: while a compaction runs, that
/// worker spins on the queue. perf showed it as about a third of the broker's CPU while a stored
/// queue drained (fjall `worker_tick`, flume send/recv); with one worker the same runs gave
/// durable-q1-os publish 325k -> 350k msg/s and drain 165k -> 187k msg/s on 2 CPUs. One worker
/// runs flushes and compactions in turn; in those runs (800k messages stored, then drained) it
/// was busy a third of the time, so it keeps up with the storage thread's writes.
const FJALL_WORKERS: usize = 1;

/// [`DurableStore::get_messages`] and the storage thread's read-ahead of Dequeues read a
/// range instead of one key each when the keys span at most this many times their number.
const DENSE_SPAN: u64 = 4;

/// Whether `n` keys from `lo` to `hi` (sorted ids or seqs) are worth one range pass instead
/// of `n` point reads (see [`DENSE_SPAN`]).
fn worth_a_range(lo: u64, hi: u64, n: usize) -> bool {
    n >= 2 && hi - lo < (n as u64).saturating_mul(DENSE_SPAN)
}

/// Largest number of ops applied in one group commit, to bound the latency of the first
/// submitter in a group and the size of one journal write.
const MAX_GROUP_OPS: usize = 4096;

/// What a completed commit promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurableMode {
    /// Written to the OS (fjall `PersistMode::Buffer`): survives a crash of the broker process,
    /// not of the machine.
    Os,
    /// `fdatasync`ed (fjall `PersistMode::SyncData`): survives power loss.
    Fsync,
}

impl DurableMode {
    fn persist_mode(self) -> PersistMode {
        match self {
            DurableMode::Os => PersistMode::Buffer,
            DurableMode::Fsync => PersistMode::SyncData,
        }
    }
}

/// One change to durable state. A `submit` is applied atomically, in order, and message
/// reference counts are settled at its end: a message moved from a queue to in-flight
/// (`Dequeue` + `PutInflight` of the same id) must be moved within one submit, or its count
/// reaches zero in between and it is deleted.
#[derive(Debug, Clone)]
pub enum Op {
    /// Stores a message. Must be referenced (Enqueue, PutInflight, PutRetained) in the same
    /// submit, or it is deleted again at the end of it.
    PutMessage(StoredMessage),
    /// Creates or replaces the session of `client_id`.
    PutSession(SessionRecord),
    /// Deletes the session's queue, in-flight and QoS 2 state, and, when the stored session of
    /// `client_id` is this `session_id` (not a newer one that took over), the session record and
    /// its subscriptions.
    DeleteSession {
        client_id: String,
        session_id: u64,
    },
    PutSubscription {
        client_id: String,
        sub: SubscriptionRecord,
    },
    DeleteSubscription {
        client_id: String,
        filter: String,
    },
    /// Appends (or replaces) the queue entry at `seq`; references `entry.msg_id`.
    Enqueue {
        session_id: u64,
        seq: u64,
        entry: QueueEntry,
    },
    /// Removes the queue entry at `seq` (no-op when absent); drops its reference.
    Dequeue {
        session_id: u64,
        seq: u64,
    },
    /// Creates or replaces the in-flight record of `rec.packet_id`.
    PutInflight {
        session_id: u64,
        rec: InflightRecord,
    },
    DeleteInflight {
        session_id: u64,
        packet_id: u16,
    },
    /// An inbound QoS 2 packet id awaiting PUBREL.
    PutQos2 {
        session_id: u64,
        packet_id: u16,
    },
    DeleteQos2 {
        session_id: u64,
        packet_id: u16,
    },
    /// Sets (or replaces) the retained message of `topic`.
    PutRetained {
        topic: String,
        msg_id: u64,
    },
    DeleteRetained {
        topic: String,
    },
    /// Removes the session's queue entries below `below` (what was queued when an operator
    /// purged the queue; later ones stay), dropping their references. In-flight records stay:
    /// those messages are already with the client.
    PurgeQueue {
        session_id: u64,
        below: u64,
    },
}

/// Why the store could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// fjall holds a lock on the directory for as long as a process has it open.
    #[error(
        "another Tern process is using the store in {path} (storage.dir); stop it, or give \
         this one its own directory"
    )]
    InUse { path: PathBuf },
    #[error("storage {path}: {source}")]
    Fjall {
        path: PathBuf,
        #[source]
        source: fjall::Error,
    },
    #[error("storage {path}: corrupt {what} at key {key}")]
    Corrupt {
        path: PathBuf,
        what: String,
        key: String,
    },
    #[error(
        "storage {path} has format {found}, newer than this build supports ({supported}); \
         run the Tern version that wrote it, or move the directory away"
    )]
    NewerFormat {
        found: u8,
        supported: u8,
        path: PathBuf,
    },
}

impl StorageError {
    fn fjall(path: &Path) -> impl FnOnce(fjall::Error) -> StorageError + '_ {
        move |source| StorageError::Fjall {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A record that does not decode. A record from a newer format is reported as such.
    fn decode(path: &Path, what: &str, key: &[u8], e: DecodeError) -> StorageError {
        match e {
            DecodeError::NewerFormat(found) => StorageError::NewerFormat {
                found,
                supported: super::record::RECORD_FORMAT,
                path: path.to_path_buf(),
            },
            e => StorageError::corrupt(path, format!("{what} ({e})"), key),
        }
    }

    fn corrupt(path: &Path, what: impl Into<String>, key: &[u8]) -> StorageError {
        StorageError::Corrupt {
            path: path.to_path_buf(),
            what: what.into(),
            key: key_text(key),
        }
    }
}

/// A key for error messages: text when it is printable, hex otherwise.
fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}"),
        _ => key.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// Position and size of a session's queue at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueInfo {
    /// Seq of the first entry (equal to `tail` when empty).
    pub head: u64,
    /// Next seq to use.
    pub tail: u64,
    pub len: u64,
    /// Sum of the entries' message weights (payload + topic bytes).
    pub bytes: u64,
}

/// Everything found at startup.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub sessions: Vec<SessionRecord>,
    /// By client id.
    pub subscriptions: HashMap<String, Vec<SubscriptionRecord>>,
    /// By session id; only sessions that have queue entries.
    pub queues: HashMap<u64, QueueInfo>,
    /// By session id, sorted by `order`, each with its message.
    pub inflight: HashMap<u64, Vec<(InflightRecord, StoredMessage)>>,
    /// By session id, ascending.
    pub qos2: HashMap<u64, Vec<u16>>,
    pub retained: Vec<StoredMessage>,
    /// Larger than every message id ever stored (including deleted ones, so ids never repeat
    /// across restarts).
    pub next_message_id: u64,
    /// Larger than every session id ever stored (same rule).
    pub next_session_id: u64,
}

/// Counters of the storage thread, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Submits completed.
    pub submits: u64,
    /// Ops applied.
    pub ops: u64,
    /// fjall batches committed (each followed by one persist).
    pub batches: u64,
    /// Batches whose persist was an fdatasync (`fsync` mode only).
    pub syncs: u64,
}

#[derive(Default)]
struct Stats {
    submits: AtomicU64,
    ops: AtomicU64,
    batches: AtomicU64,
    syncs: AtomicU64,
    observer: std::sync::OnceLock<Box<dyn CommitObserver>>,
}

/// Told about every group commit (metrics): how many submits and ops it carried, how long
/// applying, writing and persisting took, and whether it was synced to disk.
pub trait CommitObserver: Send + Sync {
    fn observe(&self, submits: usize, ops: usize, elapsed: std::time::Duration, synced: bool);
}

/// The fjall keyspaces, cloned (cheap handles) into the storage thread.
#[derive(Clone)]
struct Keyspaces {
    meta: Keyspace,
    messages: Keyspace,
    sessions: Keyspace,
    subs: Keyspace,
    queue: Keyspace,
    inflight: Keyspace,
    qos2: Keyspace,
    retained: Keyspace,
}

/// How every keyspace is created (fjall stores these with the keyspace: a store created by an
/// older Tern keeps the options it was created with).
///
/// - fjall's default memtable is 64 MiB per keyspace: with eight keyspaces a busy queue would
///   sit in the heap instead of on disk. 8 MiB keeps broker memory flat and still batches
///   flushes well.
/// - By default fjall pins the index blocks of levels 0 and 1 and the filters of level 0 in
///   memory, outside the block cache. A long offline queue is written in key order, so its
///   tables pile up in those levels and the pinned blocks grew with the queue: about 6 bytes
///   of RSS per queued message, 12 MB over 2 million (measured with the slope test in
///   tests/python/test_durability.py). Unpinned, they are read through the block cache,
///   whose size is fixed, and RSS levels off once the cache is full.
fn keyspace_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        .max_memtable_size(MEMTABLE_BYTES)
        .index_block_pinning_policy(PinningPolicy::disabled())
        .filter_block_pinning_policy(PinningPolicy::disabled())
}

impl Keyspaces {
    fn open(db: &Database, path: &Path) -> Result<Keyspaces, StorageError> {
        let ks = |name: &str| {
            db.keyspace(name, keyspace_options)
                .map_err(StorageError::fjall(path))
        };
        Ok(Keyspaces {
            meta: ks("meta")?,
            messages: ks("messages")?,
            sessions: ks("sessions")?,
            subs: ks("subs")?,
            queue: ks("queue")?,
            inflight: ks("inflight")?,
            qos2: ks("qos2")?,
            retained: ks("retained")?,
        })
    }

    fn data(&self) -> [&Keyspace; 7] {
        [
            &self.messages,
            &self.sessions,
            &self.subs,
            &self.queue,
            &self.inflight,
            &self.qos2,
            &self.retained,
        ]
    }
}

/// Key encodings (see the module documentation).
mod keys {
    pub fn message(id: u64) -> [u8; 8] {
        id.to_be_bytes()
    }

    pub fn session_prefix(session: u64) -> [u8; 8] {
        session.to_be_bytes()
    }

    pub fn queue(session: u64, seq: u64) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&session.to_be_bytes());
        k[8..].copy_from_slice(&seq.to_be_bytes());
        k
    }

    /// In-flight and QoS 2 keys.
    pub fn packet(session: u64, packet_id: u16) -> [u8; 10] {
        let mut k = [0u8; 10];
        k[..8].copy_from_slice(&session.to_be_bytes());
        k[8..].copy_from_slice(&packet_id.to_be_bytes());
        k
    }

    pub fn sub_prefix(client_id: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(client_id.len() + 1);
        k.extend_from_slice(client_id.as_bytes());
        k.push(0);
        k
    }

    pub fn sub(client_id: &str, filter: &str) -> Vec<u8> {
        let mut k = sub_prefix(client_id);
        k.extend_from_slice(filter.as_bytes());
        k
    }

    pub fn parse_u64(k: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(k.try_into().ok()?))
    }

    pub fn parse_queue(k: &[u8]) -> Option<(u64, u64)> {
        if k.len() != 16 {
            return None;
        }
        Some((parse_u64(&k[..8])?, parse_u64(&k[8..])?))
    }

    pub fn parse_packet(k: &[u8]) -> Option<(u64, u16)> {
        if k.len() != 10 {
            return None;
        }
        Some((
            parse_u64(&k[..8])?,
            u16::from_be_bytes(k[8..].try_into().ok()?),
        ))
    }

    /// Splits a subscription key into client id and filter.
    pub fn parse_sub(k: &[u8]) -> Option<(&str, &str)> {
        let nul = k.iter().position(|&b| b == 0)?;
        let client = std::str::from_utf8(&k[..nul]).ok()?;
        let filter = std::str::from_utf8(&k[nul + 1..]).ok()?;
        Some((client, filter))
    }
}

/// A submit on its way to the storage thread.
struct Request {
    ops: Vec<Op>,
    done: oneshot::Sender<()>,
    /// Run by the storage thread once the batch holding `ops` is durable, before `done`
    /// resolves; run as failed if the request is dropped unapplied.
    then: super::OnCommit,
}

/// The durable store. Cheap to share behind an `Arc`; every method takes `&self`.
///
/// fjall file descriptors: up to [`MAX_CACHED_FILES`] table files, plus the active journal,
/// the directory lock file and transient flush/compaction outputs (about 5-10 more). Measured:
/// 2 right after opening an empty store, 9 with 6 table files after 640 MiB of writes, 16
/// after reopening that store (12 tables) and reading everything: table files are opened
/// lazily and stay cached. fjall also runs its own background flush/compaction threads
/// (min(cores, 4)) besides the storage thread.
pub struct DurableStore {
    path: PathBuf,
    db: Database,
    ks: Keyspaces,
    tx: RwLock<Option<mpsc::Sender<Request>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Stats>,
}

impl DurableStore {
    /// Opens (creating if needed) the store in `dir` and recovers its contents.
    ///
    /// A journal tail torn by a crash is truncated by fjall (the batches before it survive);
    /// anything else unreadable, or a store written by a newer format, is an error naming the
    /// directory, never a silent reset. Only one process can open a directory at a time
    /// (fjall locks it).
    pub fn open(
        dir: &Path,
        durability: DurableMode,
    ) -> Result<(DurableStore, Recovered), StorageError> {
        std::fs::create_dir_all(dir).map_err(|source| StorageError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.to_path_buf();
        let db = Database::builder(dir)
            .cache_size(CACHE_BYTES)
            .max_cached_files(Some(MAX_CACHED_FILES))
            .max_journaling_size(JOURNAL_BYTES)
            .worker_threads(FJALL_WORKERS)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => StorageError::InUse { path: path.clone() },
                e => StorageError::fjall(&path)(e),
            })?;
        let ks = Keyspaces::open(&db, &path)?;
        // A marker file outside fjall, written once the store exists, tells a new directory
        // from a store whose contents fjall could not read back.
        let marker = path.join(MARKER_FILE);
        let marker_existed = marker.exists();
        recover::check_format(&db, &ks, &path, marker_existed)?;
        if !marker_existed {
            let write = || -> std::io::Result<()> {
                let f = std::fs::File::create(&marker)?;
                std::io::Write::write_all(
                    &mut &f,
                    format!("tern store format {STORE_FORMAT}\n").as_bytes(),
                )?;
                f.sync_all()
            };
            write().map_err(|source| StorageError::Io {
                path: marker.clone(),
                source,
            })?;
        }
        let (recovered, refs) = recover::recover(&db, &ks, &path)?;

        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel();
        let writer = writer::Writer::new(
            db.clone(),
            ks.clone(),
            durability.persist_mode(),
            path.clone(),
            refs,
            (recovered.next_message_id, recovered.next_session_id),
            stats.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("tern-storage".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| StorageError::Io {
                path: path.clone(),
                source,
            })?;
        let store = DurableStore {
            path,
            db,
            ks,
            tx: RwLock::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            stats,
        };
        Ok((store, recovered))
    }

    /// Queues `ops` for the next group commit without blocking. The receiver resolves once the
    /// batch containing them is committed and persisted as the [`DurableMode`] promises; if
    /// the store failed (or is closed) the sender is dropped and the receiver yields an error:
    /// the caller must not acknowledge. After a failed commit the store accepts no more
    /// writes (its reference counts can no longer be trusted); the error is logged once.
    pub fn submit(&self, ops: Vec<Op>) -> oneshot::Receiver<()> {
        self.submit_then(ops, super::OnCommit::none())
    }

    /// [`DurableStore::submit`] with effects the storage thread runs once the ops are durable
    /// (before the receiver resolves), or as failed when they are not.
    pub fn submit_then(&self, ops: Vec<Op>, then: super::OnCommit) -> oneshot::Receiver<()> {
        let (done, rx) = oneshot::channel();
        let tx = self.tx.read().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tx.as_ref() {
            // A send error means the thread is gone; dropping the request (its `done` and its
            // effects) tells the caller and releases what the effects held.
            let _ = tx.send(Request { ops, done, then });
        }
        rx
    }

    /// Queue entries of `session_id` with seq >= `from_seq`, in order, at most `limit`.
    /// The caller keeps a head cursor, so dequeued prefixes (tombstones) are not rescanned.
    pub fn read_queue(
        &self,
        session_id: u64,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, QueueEntry)>, StorageError> {
        let start = keys::queue(session_id, from_seq);
        let end = keys::queue(session_id, u64::MAX);
        let mut out = Vec::new();
        for guard in self.ks.queue.range(start..=end).take(limit) {
            let (k, v) = guard
                .into_inner()
                .map_err(StorageError::fjall(&self.path))?;
            let (_, seq) = keys::parse_queue(&k)
                .ok_or_else(|| StorageError::corrupt(&self.path, "queue key", &k))?;
            let entry = QueueEntry::decode(&v)
                .map_err(|e| StorageError::decode(&self.path, "queue entry", &k, e))?;
            out.push((seq, entry));
        }
        Ok(out)
    }

    pub fn get_message(&self, id: u64) -> Result<Option<StoredMessage>, StorageError> {
        let key = keys::message(id);
        let Some(v) = self
            .ks
            .messages
            .get(key)
            .map_err(StorageError::fjall(&self.path))?
        else {
            return Ok(None);
        };
        StoredMessage::decode(&v)
            .map(Some)
            .map_err(|e| StorageError::decode(&self.path, "message", &key, e))
    }

    /// The messages of `ids`, in the same order. When the ids are dense (their span at most
    /// [`DENSE_SPAN`] times their number, as in a queue filled by a steady stream) they are
    /// read in one pass over that key range, skipping the other sessions' messages in it;
    /// else one point read each. Why: draining a stored queue read each message with a
    /// point lookup that walked fjall's levels again, nearly two thirds of the draining
    /// connection's time (perf, `durable-q1-os`).
    pub fn get_messages(&self, ids: &[u64]) -> Result<Vec<Option<StoredMessage>>, StorageError> {
        let (Some(&lo), Some(&hi)) = (ids.iter().min(), ids.iter().max()) else {
            return Ok(Vec::new());
        };
        if !worth_a_range(lo, hi, ids.len()) {
            return ids.iter().map(|&id| self.get_message(id)).collect();
        }
        let mut at: HashMap<u64, Vec<usize>> = HashMap::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            at.entry(id).or_default().push(i);
        }
        let mut out: Vec<Option<StoredMessage>> = vec![None; ids.len()];
        let range = keys::message(lo)..=keys::message(hi);
        for guard in self.ks.messages.range(range) {
            let (k, v) = guard
                .into_inner()
                .map_err(StorageError::fjall(&self.path))?;
            let Some(positions) = keys::parse_u64(&k).and_then(|id| at.get(&id)) else {
                continue;
            };
            let m = StoredMessage::decode(&v)
                .map_err(|e| StorageError::decode(&self.path, "message", &k, e))?;
            // Moved into its last position, cloned for the others (an id asked for twice):
            // a clone of a freshly decoded payload makes it shared, an allocation.
            if let Some((&last, rest)) = positions.split_last() {
                for &i in rest {
                    out[i] = Some(m.clone());
                }
                out[last] = Some(m);
            }
        }
        Ok(out)
    }

    /// Bytes on disk (journals and tables); 0 if fjall cannot tell.
    pub fn disk_usage(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            submits: self.stats.submits.load(Ordering::Relaxed),
            ops: self.stats.ops.load(Ordering::Relaxed),
            batches: self.stats.batches.load(Ordering::Relaxed),
            syncs: self.stats.syncs.load(Ordering::Relaxed),
        }
    }

    /// Installs the observer of group commits (once; later calls are ignored).
    pub fn set_observer(&self, observer: Box<dyn CommitObserver>) {
        let _ = self.stats.observer.set(observer);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits everything submitted so far, fsyncs, and stops the storage thread. Later
    /// submits fail (their receivers yield an error). Idempotent; also done on drop.
    pub fn close(&self) {
        // Dropping the sender ends the thread's loop once it has drained the channel.
        self.tx.write().unwrap_or_else(|e| e.into_inner()).take();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!(path = %self.path.display(), "storage thread panicked");
            }
        }
    }
}

impl Drop for DurableStore {
    fn drop(&mut self) {
        self.close();
    }
}
