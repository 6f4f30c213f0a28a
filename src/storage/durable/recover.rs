//! Startup: format check, a full scan of every keyspace, and the rebuild of message reference
//! counts (which are kept only in memory, so that a write never has to read-modify-write a
//! counter on disk).

use super::{keys, Keyspaces, QueueInfo, Recovered, StorageError, STORE_FORMAT};
use crate::storage::record::{
    decode_msg_ref, InflightRecord, QueueEntry, SessionRecord, StoredMessage, SubscriptionRecord,
};
use fjall::{Database, Keyspace, PersistMode};
use std::collections::HashMap;
use std::path::Path;

const FORMAT_KEY: &[u8] = b"format";
/// High-water marks of ids, kept so that ids are not reused after their records are deleted.
pub(super) const NEXT_MESSAGE_KEY: &[u8] = b"next_message_id";
pub(super) const NEXT_SESSION_KEY: &[u8] = b"next_session_id";

/// Checks (or, in a new store, writes) the store format.
pub(super) fn check_format(
    db: &Database,
    ks: &Keyspaces,
    path: &Path,
    marker_existed: bool,
) -> Result<(), StorageError> {
    let fj = StorageError::fjall;
    match ks.meta.get(FORMAT_KEY).map_err(fj(path))? {
        Some(v) => match *v {
            [found] if found > STORE_FORMAT => Err(StorageError::NewerFormat {
                found,
                supported: STORE_FORMAT,
                path: path.to_path_buf(),
            }),
            [found] if found >= 1 => Ok(()),
            _ => Err(StorageError::corrupt(path, "format version", FORMAT_KEY)),
        },
        None if marker_existed => {
            // The store was created before (its marker file is there) but fjall found
            // nothing: the journal or tables are unreadable from the start. Recovering an
            // empty store here would silently drop every session and queued message.
            Err(StorageError::corrupt(
                path,
                "store contents (created before, but its journal and tables yield nothing: unreadable)",
                FORMAT_KEY,
            ))
        }
        None => {
            // Only an empty store may lack the marker: data without it is not ours (or lost
            // its meta keyspace), and must not be silently adopted.
            for k in ks.data() {
                if k.first_key_value().is_some() {
                    return Err(StorageError::corrupt(
                        path,
                        "store (data present but no format version)",
                        FORMAT_KEY,
                    ));
                }
            }
            ks.meta
                .insert(FORMAT_KEY, [STORE_FORMAT])
                .map_err(fj(path))?;
            db.persist(PersistMode::SyncAll).map_err(fj(path))
        }
    }
}

/// Every key/value pair of a keyspace, in key order.
fn scan<'a>(
    k: &'a Keyspace,
    path: &'a Path,
) -> impl Iterator<Item = Result<(fjall::UserKey, fjall::UserValue), StorageError>> + 'a {
    k.iter()
        .map(move |g| g.into_inner().map_err(StorageError::fjall(path)))
}

/// Reads the whole store. Returns what was found and the reference count of every message.
pub(super) fn recover(
    db: &Database,
    ks: &Keyspaces,
    path: &Path,
) -> Result<(Recovered, HashMap<u64, u32>), StorageError> {
    let mut rec = Recovered::default();
    let mut max_msg = 0u64;
    let mut max_session = 0u64;

    // Messages: validate each one, remember its weight for queue sizes.
    let mut weights: HashMap<u64, u64> = HashMap::new();
    for kv in scan(&ks.messages, path) {
        let (k, v) = kv?;
        let id =
            keys::parse_u64(&k).ok_or_else(|| StorageError::corrupt(path, "message key", &k))?;
        let m =
            StoredMessage::decode(&v).map_err(|e| StorageError::decode(path, "message", &k, e))?;
        if m.id != id {
            return Err(StorageError::corrupt(
                path,
                "message (id differs from key)",
                &k,
            ));
        }
        weights.insert(id, m.weight());
        max_msg = max_msg.max(id);
    }

    let mut refs: HashMap<u64, u32> = HashMap::new();
    let mut add_ref = |id: u64, max_msg: &mut u64| {
        *refs.entry(id).or_insert(0) += 1;
        *max_msg = (*max_msg).max(id);
    };

    for kv in scan(&ks.sessions, path) {
        let (k, v) = kv?;
        let s =
            SessionRecord::decode(&v).map_err(|e| StorageError::decode(path, "session", &k, e))?;
        if s.client_id.as_bytes() != &*k {
            return Err(StorageError::corrupt(
                path,
                "session (client id differs from key)",
                &k,
            ));
        }
        max_session = max_session.max(s.session_id);
        rec.sessions.push(s);
    }

    for kv in scan(&ks.subs, path) {
        let (k, v) = kv?;
        let (client, filter) = keys::parse_sub(&k)
            .ok_or_else(|| StorageError::corrupt(path, "subscription key", &k))?;
        let sub = SubscriptionRecord::decode(&v)
            .map_err(|e| StorageError::decode(path, "subscription", &k, e))?;
        if sub.filter != filter {
            return Err(StorageError::corrupt(
                path,
                "subscription (filter differs from key)",
                &k,
            ));
        }
        rec.subscriptions
            .entry(client.to_owned())
            .or_default()
            .push(sub);
    }

    for kv in scan(&ks.queue, path) {
        let (k, v) = kv?;
        let (session, seq) =
            keys::parse_queue(&k).ok_or_else(|| StorageError::corrupt(path, "queue key", &k))?;
        let e =
            QueueEntry::decode(&v).map_err(|e| StorageError::decode(path, "queue entry", &k, e))?;
        add_ref(e.msg_id, &mut max_msg);
        max_session = max_session.max(session);
        let weight = weights.get(&e.msg_id).copied().unwrap_or_else(|| {
            tracing::warn!(path = %path.display(), session, seq, msg_id = e.msg_id,
                "queue entry refers to a missing message");
            0
        });
        // Keys come in order, so the first entry of a session is its head.
        let q = rec.queues.entry(session).or_insert(QueueInfo {
            head: seq,
            ..QueueInfo::default()
        });
        q.tail = seq.saturating_add(1);
        q.len += 1;
        q.bytes += weight;
    }

    for kv in scan(&ks.inflight, path) {
        let (k, v) = kv?;
        let (session, packet_id) = keys::parse_packet(&k)
            .ok_or_else(|| StorageError::corrupt(path, "inflight key", &k))?;
        let r = InflightRecord::decode(&v)
            .map_err(|e| StorageError::decode(path, "inflight record", &k, e))?;
        if r.packet_id != packet_id {
            return Err(StorageError::corrupt(
                path,
                "inflight record (packet id differs from key)",
                &k,
            ));
        }
        add_ref(r.entry.msg_id, &mut max_msg);
        max_session = max_session.max(session);
        match load(ks, path, r.entry.msg_id)? {
            Some(m) => rec.inflight.entry(session).or_default().push((r, m)),
            None => tracing::warn!(path = %path.display(), session, packet_id,
                msg_id = r.entry.msg_id, "in-flight record refers to a missing message; skipped"),
        }
    }
    for list in rec.inflight.values_mut() {
        list.sort_by_key(|(r, _)| r.order);
    }

    for kv in scan(&ks.qos2, path) {
        let (k, _) = kv?;
        let (session, packet_id) =
            keys::parse_packet(&k).ok_or_else(|| StorageError::corrupt(path, "qos2 key", &k))?;
        max_session = max_session.max(session);
        rec.qos2.entry(session).or_default().push(packet_id);
    }

    for kv in scan(&ks.retained, path) {
        let (k, v) = kv?;
        let id = decode_msg_ref(&v).map_err(|e| StorageError::decode(path, "retained", &k, e))?;
        add_ref(id, &mut max_msg);
        match load(ks, path, id)? {
            Some(m) => rec.retained.push(m),
            None => tracing::warn!(path = %path.display(), topic = %String::from_utf8_lossy(&k),
                msg_id = id, "retained topic refers to a missing message; skipped"),
        }
    }

    // Messages without a reference cannot be produced by this engine's atomic batches, but a
    // store is only trusted as far as it is checked: collect them rather than keep them forever.
    let orphans: Vec<u64> = weights
        .keys()
        .filter(|id| !refs.contains_key(id))
        .copied()
        .collect();
    if !orphans.is_empty() {
        tracing::warn!(path = %path.display(), count = orphans.len(),
            "deleting stored messages that nothing refers to");
        let mut batch = db.batch().durability(Some(PersistMode::SyncData));
        for id in orphans {
            batch.remove(&ks.messages, keys::message(id));
        }
        batch.commit().map_err(StorageError::fjall(path))?;
    }

    let mark = |key: &[u8]| -> Result<u64, StorageError> {
        match ks.meta.get(key).map_err(StorageError::fjall(path))? {
            None => Ok(0),
            Some(v) => {
                keys::parse_u64(&v).ok_or_else(|| StorageError::corrupt(path, "id mark", key))
            }
        }
    };
    // The writer keeps only counts other than 1 (see `Writer::add_ref`).
    refs.retain(|_, n| *n != 1);
    refs.shrink_to_fit();
    rec.next_message_id = max_msg.saturating_add(1).max(mark(NEXT_MESSAGE_KEY)?);
    rec.next_session_id = max_session.saturating_add(1).max(mark(NEXT_SESSION_KEY)?);
    Ok((rec, refs))
}

fn load(ks: &Keyspaces, path: &Path, id: u64) -> Result<Option<StoredMessage>, StorageError> {
    let key = keys::message(id);
    match ks.messages.get(key).map_err(StorageError::fjall(path))? {
        None => Ok(None),
        Some(v) => StoredMessage::decode(&v)
            .map(Some)
            .map_err(|e| StorageError::decode(path, "message", &key, e)),
    }
}
