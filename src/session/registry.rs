//! ClientId → session. Connections attach and detach; the registry keeps a session while its
//! client is away and decides takeovers and expiry.
//!
//! Ownership of a session's state is an owned async mutex guard: the attached connection holds
//! it for its whole life, so the hot path never locks, and a takeover is "kick the old
//! connection, then wait for its guard" — whatever it had in flight moves with the state.

use super::SessionState;
use crate::outbox::Outbox;
use crate::storage::record::SubscriptionRecord;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, OwnedMutexGuard};

/// The part of a session that publishers reach: its identity and its outbox.
pub struct SessionHandle {
    /// Unique per session (a clean start on the same ClientId keeps it; a new session after
    /// expiry gets a new one). Used as the subscription key and for No Local.
    pub id: u64,
    pub client_id: Arc<str>,
    pub outbox: Outbox,
    /// Whether the session outlives its connection and is kept in the durable store: its
    /// QoS 1/2 deliveries are then stored before they are acknowledged to the publisher.
    pub persistent: AtomicBool,
    /// The user name of its current (or last) connection, for ACL checks on delivery.
    pub user: std::sync::RwLock<Option<Arc<str>>>,
    /// QoS 1/2 messages sent and not yet acknowledged, as its connection last reported
    /// (the state itself is owned by that connection): read by metrics at scrape time.
    pub inflight: AtomicUsize,
    /// In a cluster: the node's position in the messages stream at which its connection last
    /// found the session drained (nothing queued, nothing in flight). See `cluster/anchors.rs`.
    pub drained_at: AtomicU64,
    /// The subscriptions as its connection last changed them, for the admin API: the state
    /// itself is the connection's while it is attached. Written once per SUBSCRIBE or
    /// UNSUBSCRIBE, never on the message path.
    subscriptions: Mutex<Arc<[SubscriptionRecord]>>,
}

impl SessionHandle {
    pub fn new(id: u64, client_id: Arc<str>, outbox: Outbox, persistent: bool) -> SessionHandle {
        SessionHandle {
            id,
            client_id,
            outbox,
            persistent: AtomicBool::new(persistent),
            user: std::sync::RwLock::new(None),
            inflight: AtomicUsize::new(0),
            drained_at: AtomicU64::new(0),
            subscriptions: Mutex::new(Arc::from(Vec::new())),
        }
    }

    /// The subscriptions its connection reported last ([`SessionHandle::set_subscriptions`]).
    pub fn subscriptions(&self) -> Arc<[SubscriptionRecord]> {
        self.subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_subscriptions(&self, subs: Vec<SubscriptionRecord>) {
        *self
            .subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::from(subs);
    }

    pub fn username(&self) -> Option<Arc<str>> {
        self.user
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_username(&self, user: Option<Arc<str>>) {
        *self.user.write().unwrap_or_else(PoisonError::into_inner) = user;
    }
}

/// What [`Registry::moved`] did.
pub enum Moved {
    /// No session here, or one another connection here holds.
    Nothing,
    /// Its connection was asked to leave; the session ends when it does.
    Kicked,
    /// The session's client was away: it ended, and the caller discards its state.
    Ended(Expired),
}

/// Why a connection is asked to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// Another connection with the same ClientId took the session ([MQTT-3.1.4-3]).
    TakenOver,
    /// The broker is shutting down ([`Registry::close`]).
    Shutdown,
    /// An operator asked for it through the admin API ([`Registry::kick`]); v5 clients read
    /// DISCONNECT 0x98 Administrative action.
    Admin,
}

/// The connection attached to a session, as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// `"3.1"`, `"3.1.1"` or `"5.0"`.
    pub protocol: &'static str,
    /// The listener that accepted it: `tcp`, `tls`, `ws`, `wss`.
    pub listener: &'static str,
    /// Keep Alive in effect, seconds.
    pub keep_alive: u16,
    /// Unix time of the CONNECT, milliseconds.
    pub since_ms: u64,
}

/// One session as the admin API lists it, read under the registry lock (its outbox after).
#[derive(Clone)]
pub struct SessionView {
    pub handle: Arc<SessionHandle>,
    /// The attached connection; None while the client is away.
    pub conn: Option<ConnInfo>,
    /// Session Expiry Interval of the attached connection, seconds (`u32::MAX`: never).
    pub expiry: u32,
    /// Seconds until a detached session ends; None while attached or when it never expires.
    pub expires_in: Option<u64>,
    pub online: bool,
}

/// Which sessions [`Registry::page`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    Any,
    Online,
    Offline,
}

/// What [`Registry::kick`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kicked {
    /// No session of that client id here.
    Unknown,
    /// A session, but no connection attached to it.
    Offline,
    /// Its connection was asked to leave.
    Connected,
}

struct Attachment {
    conn_id: u64,
    kick: Option<oneshot::Sender<Kick>>,
    expiry: u32,
    /// Set by [`Registry::set_conn_info`] once the connection is accepted.
    info: Option<ConnInfo>,
}

struct Entry {
    handle: Arc<SessionHandle>,
    state: Arc<tokio::sync::Mutex<SessionState>>,
    /// The attached connection, the channel that asks it to leave, and the Session Expiry
    /// Interval it connected with.
    attached: Option<Attachment>,
    /// When a detached session ends; None while attached or when it never expires.
    expires_at: Option<Instant>,
    /// A delayed Will waiting to be published; a reconnect cancels it ([MQTT-3.1.3-9]).
    pending_will: Option<tokio::task::AbortHandle>,
    /// The client id connected on another node of the cluster: the session ends when its
    /// connection here lets go ([`Registry::moved`]).
    moved: bool,
    /// The admin API deleted the session while a connection held it: it ends when that
    /// connection lets go, whatever its Session Expiry Interval.
    deleted: bool,
}

pub struct Registry {
    /// Ordered by client id, so the admin API pages through a million sessions by cursor
    /// ([`Registry::page`]) without sorting them each time.
    entries: Mutex<BTreeMap<Arc<str>, Entry>>,
    /// Set by [`Registry::close`], read and written under the `entries` lock: a connection
    /// attaching after it is told to shut down at once.
    closing: AtomicBool,
    next_id: AtomicU64,
    /// Queue limits of sessions made from now on (a reload may change them; existing
    /// sessions keep theirs).
    max_queued_messages: AtomicUsize,
    max_queued_bytes: AtomicUsize,
    /// The same for sessions that outlive their connection (their queue lives on disk
    /// beyond a memory share, `outbox.rs`).
    max_queued_messages_persistent: AtomicUsize,
    max_queued_bytes_persistent: AtomicUsize,
}

/// Session numbers read at scrape time.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionStats {
    pub online: usize,
    pub offline: usize,
    /// Messages waiting in session queues (memory and disk), not yet sent.
    pub queued: usize,
    /// Their bytes, as `limits.max_queued_bytes` counts them.
    pub queued_bytes: usize,
    /// QoS 1/2 messages sent and not yet acknowledged.
    pub inflight: usize,
    /// Places reserved in session queues whose commit has not settled.
    pub reservations_open: usize,
    /// Sessions whose queue holds at most `QUEUE_DEPTH_BUCKETS[i]` messages (cumulative).
    pub depth: [usize; QUEUE_DEPTH_BUCKETS.len()],
}

/// One session's backlog, for the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub client_id: Arc<str>,
    pub queued: usize,
    pub inflight: usize,
    pub online: bool,
}

/// Upper bounds of the queue depth distribution (`tern_sessions_by_queue_depth{at_most=...}`).
pub const QUEUE_DEPTH_BUCKETS: [usize; 5] = [0, 10, 100, 1000, 10000];

/// A connection's claim on its session.
pub struct Attached {
    pub handle: Arc<SessionHandle>,
    pub state: OwnedMutexGuard<SessionState>,
    /// A session for this ClientId existed before and continues (for Session Present). False
    /// also when the previous connection's session ends with it (expiry 0): the state may then
    /// hold leftovers the caller must discard.
    pub existed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("previous connection did not release the session in time")]
    Busy,
}

/// What happened to a session when its connection left.
pub enum Detached {
    /// The session ended now: its subscriptions must leave the index.
    Ended(Arc<SessionHandle>),
    /// Kept for a returning client.
    Kept,
    /// Another connection owns it now; nothing to do.
    TakenOver,
}

/// A session that expired while its client was away.
pub struct Expired {
    pub handle: Arc<SessionHandle>,
    pub state: Arc<tokio::sync::Mutex<SessionState>>,
}

impl Registry {
    pub fn new(max_queued_messages: usize, max_queued_bytes: usize) -> Registry {
        Registry {
            entries: Mutex::new(BTreeMap::new()),
            closing: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            max_queued_messages: AtomicUsize::new(max_queued_messages),
            max_queued_bytes: AtomicUsize::new(max_queued_bytes),
            max_queued_messages_persistent: AtomicUsize::new(max_queued_messages),
            max_queued_bytes_persistent: AtomicUsize::new(max_queued_bytes),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Arc<str>, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims the session of `client_id` for connection `conn_id`, creating it if needed and
    /// kicking a connection that holds it. Waits up to `wait` for that connection to let go.
    pub async fn attach(
        &self,
        client_id: &str,
        conn_id: u64,
        expiry: u32,
        kick: oneshot::Sender<Kick>,
        wait: Duration,
    ) -> Result<Attached, AttachError> {
        let mut attachment = Attachment {
            conn_id,
            kick: Some(kick),
            expiry,
            info: None,
        };
        let (handle, state, existed) = {
            let mut map = self.lock();
            if self.closing.load(Ordering::Relaxed) {
                if let Some(kick) = attachment.kick.take() {
                    let _ = kick.send(Kick::Shutdown);
                }
            }
            match map.get_mut(client_id) {
                Some(entry) => {
                    // A session whose connection is still attached with expiry 0 ends with that
                    // connection: we take the entry over but not the session.
                    // A session whose client id went to another node meanwhile is stale.
                    let mut continues = !std::mem::take(&mut entry.moved);
                    continues &= !std::mem::take(&mut entry.deleted);
                    if let Some(old) = entry.attached.take() {
                        continues &= old.expiry != 0;
                        if let Some(kick) = old.kick {
                            let _ = kick.send(Kick::TakenOver);
                        }
                    }
                    if let Some(will) = entry.pending_will.take() {
                        will.abort();
                    }
                    entry.attached = Some(attachment);
                    entry.expires_at = None;
                    // The limits of what the session is from now on (a clean start over a
                    // persistent session, or the other way round, keeps the handle).
                    let (messages, bytes) = self.queue_limits(expiry != 0);
                    entry.handle.outbox.set_limits(messages, bytes);
                    (entry.handle.clone(), entry.state.clone(), continues)
                }
                None => {
                    let client_id: Arc<str> = Arc::from(client_id);
                    let handle = Arc::new(SessionHandle::new(
                        self.next_id.fetch_add(1, Ordering::Relaxed),
                        client_id.clone(),
                        self.new_outbox(expiry != 0),
                        false,
                    ));
                    let state = Arc::new(tokio::sync::Mutex::new(SessionState::default()));
                    map.insert(
                        client_id,
                        Entry {
                            handle: handle.clone(),
                            state: state.clone(),
                            attached: Some(attachment),
                            expires_at: None,
                            pending_will: None,
                            moved: false,
                            deleted: false,
                        },
                    );
                    (handle, state, false)
                }
            }
        };
        let mut state = tokio::time::timeout(wait, state.lock_owned())
            .await
            .map_err(|_| AttachError::Busy)?;
        // Decided again now that the previous connection has let go: it may have read a
        // DISCONNECT that ended the session after we kicked it.
        let ended = std::mem::take(&mut state.ended);
        let existed = existed && !ended;
        Ok(Attached {
            handle,
            state,
            existed,
        })
    }

    /// Tells every attached connection, and every one that attaches from now on, to shut down
    /// (`Kick::Shutdown`). This is how a connection learns of a shutdown: through the channel
    /// it already waits on for a takeover, instead of a shutdown watch of its own whose wait
    /// would sit in every idle connection's task (120 bytes each).
    pub fn close(&self) {
        let mut map = self.lock();
        self.closing.store(true, Ordering::Relaxed);
        for entry in map.values_mut() {
            if let Some(kick) = entry.attached.as_mut().and_then(|a| a.kick.take()) {
                let _ = kick.send(Kick::Shutdown);
            }
        }
    }

    /// `client_id` connected on another node of the cluster ([MQTT-3.1.4-3] across nodes):
    /// the session here must not live on beside the one there. With `Some(conn_id)`, that
    /// connection, if it still holds the session, is asked to leave and the session ends
    /// when it does. With `None`, a session whose client is away ends now, its delayed will
    /// cancelled (the client is back, elsewhere); one a connection holds is left alone (that
    /// connection's own claim decides, by revision).
    pub fn moved(&self, client_id: &str, conn_id: Option<u64>) -> Moved {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(client_id) else {
            return Moved::Nothing;
        };
        match &mut entry.attached {
            Some(a) if conn_id == Some(a.conn_id) => {
                entry.moved = true;
                let kicked = a
                    .kick
                    .take()
                    .is_some_and(|k| k.send(Kick::TakenOver).is_ok());
                if kicked {
                    Moved::Kicked
                } else {
                    Moved::Nothing
                }
            }
            Some(_) => Moved::Nothing,
            None if conn_id.is_some() => Moved::Nothing,
            None => {
                let Some(e) = map.remove(client_id) else {
                    return Moved::Nothing;
                };
                if let Some(will) = e.pending_will {
                    will.abort();
                }
                Moved::Ended(Expired {
                    handle: e.handle,
                    state: e.state,
                })
            }
        }
    }

    /// Takes `client_id`'s session to hand it to another node of the cluster: a connection
    /// holding it is asked to leave ([MQTT-3.1.4-3], the client is connecting elsewhere), a
    /// delayed will is cancelled (its client is back), and once nobody holds the state the
    /// caller does. `None` when there is no session (or it ended as its connection left).
    /// The entry stays, detached, until [`Registry::remove_handed_over`].
    pub async fn take_for_handover(
        &self,
        client_id: &str,
        wait: Duration,
    ) -> Option<(Arc<SessionHandle>, OwnedMutexGuard<SessionState>)> {
        let (handle, state) = {
            let mut map = self.lock();
            let entry = map.get_mut(client_id)?;
            if let Some(kick) = entry.attached.as_mut().and_then(|a| a.kick.take()) {
                let _ = kick.send(Kick::TakenOver);
            }
            (entry.handle.clone(), entry.state.clone())
        };
        let guard = tokio::time::timeout(wait, state.lock_owned()).await.ok()?;
        let mut map = self.lock();
        let entry = map
            .get_mut(client_id)
            .filter(|e| e.handle.id == handle.id && e.attached.is_none())?;
        if let Some(will) = entry.pending_will.take() {
            will.abort();
        }
        // Not an expiry candidate while it moves.
        entry.expires_at = None;
        Some((handle, guard))
    }

    /// The session handed over by [`Registry::take_for_handover`] is the other node's now:
    /// its entry goes (unless a connection here attached to it meanwhile).
    pub fn remove_handed_over(&self, client_id: &str, session_id: u64) -> bool {
        let mut map = self.lock();
        let ours = map
            .get(client_id)
            .is_some_and(|e| e.handle.id == session_id && e.attached.is_none());
        if ours {
            map.remove(client_id);
        }
        ours
    }

    /// Releases the session of connection `conn_id`. `expiry` is the Session Expiry Interval
    /// in seconds (`u32::MAX`: never); 0 ends the session now.
    pub fn detach(&self, client_id: &str, conn_id: u64, expiry: u32) -> Detached {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(client_id) else {
            return Detached::TakenOver;
        };
        if entry.attached.as_ref().is_none_or(|a| a.conn_id != conn_id) {
            return Detached::TakenOver;
        }
        entry.attached = None;
        entry.handle.outbox.set_online(false);
        if expiry == 0 || entry.moved || entry.deleted {
            let handle = entry.handle.clone();
            map.remove(client_id);
            return Detached::Ended(handle);
        }
        entry.expires_at = if expiry == u32::MAX {
            None
        } else {
            Some(crate::clock::now() + Duration::from_secs(u64::from(expiry)))
        };
        Detached::Kept
    }

    /// Records what the admin API shows of connection `conn_id` (if it still holds the
    /// session of `client_id`).
    pub fn set_conn_info(&self, client_id: &str, conn_id: u64, info: ConnInfo) {
        let mut map = self.lock();
        if let Some(a) = map
            .get_mut(client_id)
            .and_then(|e| e.attached.as_mut())
            .filter(|a| a.conn_id == conn_id)
        {
            a.info = Some(info);
        }
    }

    /// Asks the connection holding `client_id`'s session to leave (v5: DISCONNECT 0x98).
    /// With `delete`, the session ends too: now when its client is away (the caller ends
    /// what is returned, as for an expiry), else once its connection has let go.
    pub fn kick(&self, client_id: &str, delete: bool) -> (Kicked, Option<Expired>) {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(client_id) else {
            return (Kicked::Unknown, None);
        };
        match entry.attached.as_mut() {
            Some(a) => {
                if let Some(kick) = a.kick.take() {
                    let _ = kick.send(Kick::Admin);
                }
                entry.deleted |= delete;
                (Kicked::Connected, None)
            }
            None if !delete => (Kicked::Offline, None),
            None => {
                let ended = map.remove(client_id).map(|e| {
                    if let Some(will) = e.pending_will {
                        will.abort();
                    }
                    Expired {
                        handle: e.handle,
                        state: e.state,
                    }
                });
                (Kicked::Offline, ended)
            }
        }
    }

    fn view_of(e: &Entry, now: Instant) -> SessionView {
        SessionView {
            handle: e.handle.clone(),
            conn: e.attached.as_ref().and_then(|a| a.info.clone()),
            expiry: e.attached.as_ref().map_or(0, |a| a.expiry),
            expires_in: e
                .expires_at
                .map(|t| t.saturating_duration_since(now).as_secs()),
            online: e.attached.is_some(),
        }
    }

    /// Up to `limit` sessions with client ids after `after`, in client id order, and the
    /// cursor for the next page (None at the end). At most `limit * 16 + 1024` entries are
    /// looked at under the lock, so a page costs the same with a million sessions; a filter
    /// that matches few of them returns short pages (possibly empty) with a cursor rather
    /// than scanning everything at once.
    pub fn page(
        &self,
        after: Option<&str>,
        limit: usize,
        presence: Presence,
    ) -> (Vec<SessionView>, Option<String>) {
        let budget = limit.saturating_mul(16).saturating_add(1024);
        let now = crate::clock::now();
        let map = self.lock();
        let range = match after {
            Some(a) => map.range::<str, _>((Bound::Excluded(a), Bound::Unbounded)),
            None => map.range::<str, _>((Bound::Unbounded, Bound::Unbounded)),
        };
        let mut out = Vec::new();
        let mut last: Option<&Arc<str>> = None;
        let mut more = false;
        for (looked, (id, e)) in range.enumerate() {
            if out.len() == limit || looked == budget {
                more = true;
                break;
            }
            last = Some(id);
            let wanted = match presence {
                Presence::Any => true,
                Presence::Online => e.attached.is_some(),
                Presence::Offline => e.attached.is_none(),
            };
            if wanted {
                out.push(Self::view_of(e, now));
            }
        }
        let next = if more {
            last.map(|s| s.to_string())
        } else {
            None
        };
        (out, next)
    }

    /// One session, as [`Registry::page`] lists it.
    pub fn view(&self, client_id: &str) -> Option<SessionView> {
        let now = crate::clock::now();
        self.lock().get(client_id).map(|e| Self::view_of(e, now))
    }

    /// Whether session `session_id` of `client_id` exists and waits for its client.
    pub fn is_detached(&self, client_id: &str, session_id: u64) -> bool {
        self.lock()
            .get(client_id)
            .is_some_and(|e| e.handle.id == session_id && e.attached.is_none())
    }

    /// The state of `client_id`'s session (to read while nobody holds it).
    pub fn state_of(&self, client_id: &str) -> Option<Arc<tokio::sync::Mutex<SessionState>>> {
        self.lock().get(client_id).map(|e| e.state.clone())
    }

    /// Every session's handle.
    pub fn handles(&self) -> Vec<Arc<SessionHandle>> {
        self.lock().values().map(|e| e.handle.clone()).collect()
    }

    /// Sessions whose client is away.
    pub fn detached(&self) -> Vec<Arc<SessionHandle>> {
        self.lock()
            .values()
            .filter(|e| e.attached.is_none())
            .map(|e| e.handle.clone())
            .collect()
    }

    /// A fresh id from the session id space (shared subscription groups use it for their
    /// queues, so the index, the store and No Local never confuse the two).
    pub fn allocate_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Session ids continue above what the store has used.
    pub fn set_next_id(&self, next: u64) {
        self.next_id.fetch_max(next, Ordering::Relaxed);
    }

    /// Puts a session recovered from the store back, detached. `expires_at` None: never.
    pub fn restore(
        &self,
        client_id: &str,
        session_id: u64,
        state: SessionState,
        expires_at: Option<Instant>,
    ) -> Arc<SessionHandle> {
        let client_id: Arc<str> = Arc::from(client_id);
        let handle = Arc::new(SessionHandle::new(
            session_id,
            client_id.clone(),
            self.new_outbox(true),
            true,
        ));
        handle
            .inflight
            .store(state.inflight.len(), Ordering::Relaxed);
        self.set_next_id(session_id + 1);
        self.lock().insert(
            client_id,
            Entry {
                handle: handle.clone(),
                state: Arc::new(tokio::sync::Mutex::new(state)),
                attached: None,
                expires_at,
                pending_will: None,
                moved: false,
                deleted: false,
            },
        );
        handle
    }

    /// Remembers a delayed Will so a reconnect can cancel it.
    pub fn set_pending_will(
        &self,
        client_id: &str,
        session_id: u64,
        will: tokio::task::AbortHandle,
    ) {
        let mut map = self.lock();
        match map.get_mut(client_id) {
            Some(e) if e.handle.id == session_id && e.attached.is_none() => {
                if let Some(old) = e.pending_will.replace(will) {
                    old.abort();
                }
            }
            // The client is already back (or the session is gone): the will must not fire.
            _ => will.abort(),
        }
    }

    /// Removes and returns sessions whose expiry has passed while detached.
    pub fn take_expired(&self, now: Instant) -> Vec<Expired> {
        let mut map = self.lock();
        let ids: Vec<Arc<str>> = map
            .iter()
            .filter(|(_, e)| e.attached.is_none() && e.expires_at.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        ids.into_iter()
            .filter_map(|k| map.remove(&k))
            .map(|e| Expired {
                handle: e.handle,
                state: e.state,
            })
            .collect()
    }

    /// The queue limits of a session: `persistent` when it outlives its connection (attached
    /// with a session expiry, or restored from the store).
    fn queue_limits(&self, persistent: bool) -> (usize, usize) {
        if persistent {
            (
                self.max_queued_messages_persistent.load(Ordering::Relaxed),
                self.max_queued_bytes_persistent.load(Ordering::Relaxed),
            )
        } else {
            (
                self.max_queued_messages.load(Ordering::Relaxed),
                self.max_queued_bytes.load(Ordering::Relaxed),
            )
        }
    }

    fn new_outbox(&self, persistent: bool) -> Outbox {
        let (messages, bytes) = self.queue_limits(persistent);
        Outbox::new(messages, bytes)
    }

    /// Queue limits for sessions made after this call: clean ones, and persistent ones.
    pub fn set_queue_limits(&self, clean: (usize, usize), persistent: (usize, usize)) {
        self.max_queued_messages.store(clean.0, Ordering::Relaxed);
        self.max_queued_bytes.store(clean.1, Ordering::Relaxed);
        self.max_queued_messages_persistent
            .store(persistent.0, Ordering::Relaxed);
        self.max_queued_bytes_persistent
            .store(persistent.1, Ordering::Relaxed);
    }

    /// Counts and queue depths of every session.
    pub fn stats(&self) -> SessionStats {
        self.stats_and_deepest(0).0
    }

    /// Counts and queue depths of every session, and the `n` sessions with the most queued
    /// messages (status page), deepest first. One pass; the registry lock is held only to copy
    /// the handles, each outbox is read after it is released.
    pub fn stats_and_deepest(&self, n: usize) -> (SessionStats, Vec<QueueDepth>) {
        let handles: Vec<(Arc<SessionHandle>, bool)> = self
            .lock()
            .values()
            .map(|e| (e.handle.clone(), e.attached.is_some()))
            .collect();
        let mut st = SessionStats::default();
        let mut all = Vec::with_capacity(if n > 0 { handles.len() } else { 0 });
        for (h, online) in handles {
            if online {
                st.online += 1;
            } else {
                st.offline += 1;
            }
            let (queued, reservations_open, bytes) = h.outbox.counts_and_bytes();
            let inflight = h.inflight.load(Ordering::Relaxed);
            st.queued += queued;
            st.queued_bytes += bytes;
            st.inflight += inflight;
            st.reservations_open += reservations_open;
            for (i, le) in QUEUE_DEPTH_BUCKETS.iter().enumerate() {
                if queued <= *le {
                    st.depth[i] += 1;
                }
            }
            if n > 0 {
                all.push(QueueDepth {
                    client_id: h.client_id.clone(),
                    queued,
                    inflight,
                    online,
                });
            }
        }
        let key = |q: &QueueDepth| std::cmp::Reverse((q.queued, q.inflight));
        if all.len() > n {
            all.select_nth_unstable_by_key(n, key);
            all.truncate(n);
        }
        all.sort_by_key(key);
        (st, all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (connected, disconnected) session counts.
    fn counts(r: &Registry) -> (usize, usize) {
        let s = r.stats();
        (s.online, s.offline)
    }

    /// A session's queue limits follow what it is: the persistent ones when attached with a
    /// session expiry or restored from the store, the clean ones otherwise; attaching with the
    /// other kind switches them.
    #[tokio::test]
    async fn queue_limits_follow_the_kind_of_session() {
        let r = Registry::new(10, 1000);
        r.set_queue_limits((10, 1000), (500, 50_000));
        let attach = |cid: &'static str, conn: u64, expiry: u32| {
            let (tx, _rx) = oneshot::channel();
            r.attach(cid, conn, expiry, tx, Duration::from_secs(1))
        };
        let a = attach("p", 1, 60).await.unwrap();
        assert_eq!(a.handle.outbox.limits(), (500, 50_000));
        drop(a);
        assert!(matches!(r.detach("p", 1, 60), Detached::Kept));
        let b = attach("p", 2, 0).await.unwrap();
        assert_eq!(b.handle.outbox.limits(), (10, 1000), "now clean");
        drop(b);
        let c = attach("c", 3, 0).await.unwrap();
        assert_eq!(c.handle.outbox.limits(), (10, 1000));
        drop(c);
        let restored = r.restore("r", 99, SessionState::default(), None);
        assert_eq!(restored.outbox.limits(), (500, 50_000));
    }

    #[tokio::test]
    async fn attach_detach_and_present() {
        let r = Registry::new(10, 1000);
        let (tx, _rx) = oneshot::channel();
        let a = r
            .attach("c", 1, 60, tx, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(!a.existed);
        let id = a.handle.id;
        drop(a);
        assert!(matches!(r.detach("c", 1, 60), Detached::Kept));
        assert_eq!(counts(&r), (0, 1));
        let (tx, _rx) = oneshot::channel();
        let b = r
            .attach("c", 2, 60, tx, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(b.existed);
        assert_eq!(b.handle.id, id);
        drop(b);
        assert!(matches!(r.detach("c", 2, 0), Detached::Ended(_)));
        assert_eq!(counts(&r), (0, 0));
    }

    /// A client id that connected on another node: the connection here is told to leave
    /// (only the one that claimed it), its session ends with it instead of waiting for a
    /// return, and an away session ends at once; a session a connection holds is not ended
    /// behind its back.
    #[tokio::test]
    async fn a_session_moved_to_another_node_ends_here() {
        let r = Registry::new(10, 1000);
        let (tx, mut rx) = oneshot::channel();
        drop(
            r.attach("c", 1, 60, tx, Duration::from_secs(1))
                .await
                .unwrap(),
        );
        assert!(
            matches!(r.moved("c", None), Moved::Nothing),
            "held by a connection"
        );
        assert!(
            matches!(r.moved("c", Some(9)), Moved::Nothing),
            "another connection's claim"
        );
        assert!(rx.try_recv().is_err());
        assert!(matches!(r.moved("c", Some(1)), Moved::Kicked));
        assert_eq!(rx.try_recv().unwrap(), Kick::TakenOver);
        assert!(matches!(r.detach("c", 1, 60), Detached::Ended(_)));
        assert_eq!(counts(&r), (0, 0));

        let (tx, _rx) = oneshot::channel();
        drop(
            r.attach("d", 2, 60, tx, Duration::from_secs(1))
                .await
                .unwrap(),
        );
        assert!(matches!(r.detach("d", 2, 60), Detached::Kept));
        assert!(matches!(r.moved("d", None), Moved::Ended(_)));
        assert_eq!(counts(&r), (0, 0));
        assert!(matches!(r.moved("nobody", None), Moved::Nothing));

        // The client comes back here while its old connection is being told to leave: the
        // session it finds is not the stale one.
        let (tx, _rx) = oneshot::channel();
        drop(
            r.attach("e", 3, 60, tx, Duration::from_secs(1))
                .await
                .unwrap(),
        );
        assert!(matches!(r.moved("e", Some(3)), Moved::Kicked));
        let (tx, _rx) = oneshot::channel();
        let back = r
            .attach("e", 4, 60, tx, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(!back.existed);
        drop(back);
        assert!(matches!(r.detach("e", 3, 60), Detached::TakenOver));
        assert!(
            matches!(r.detach("e", 4, 60), Detached::Kept),
            "moved was reset"
        );
    }

    /// A shutdown reaches every attached connection, and one that attaches afterwards (its
    /// CONNECT was being handled) at once: none is left serving after `close`.
    #[tokio::test]
    async fn close_tells_attached_and_later_connections_to_shut_down() {
        let r = Registry::new(10, 1000);
        let (tx1, mut rx1) = oneshot::channel();
        let _a = r
            .attach("a", 1, 60, tx1, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(rx1.try_recv().is_err(), "nothing sent before close");
        // A detached session has no connection to tell.
        let (tx2, _rx2) = oneshot::channel();
        drop(
            r.attach("b", 2, 60, tx2, Duration::from_secs(1))
                .await
                .unwrap(),
        );
        assert!(matches!(r.detach("b", 2, 60), Detached::Kept));
        r.close();
        assert_eq!(rx1.try_recv().unwrap(), Kick::Shutdown);
        let (tx3, mut rx3) = oneshot::channel();
        let _c = r
            .attach("c", 3, 60, tx3, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(rx3.try_recv().unwrap(), Kick::Shutdown);
        // Closing twice is harmless.
        r.close();
    }

    #[tokio::test]
    async fn takeover_kicks_and_waits_for_the_state() {
        let r = Arc::new(Registry::new(10, 1000));
        let (tx1, rx1) = oneshot::channel();
        let mut first = r
            .attach("c", 1, 60, tx1, Duration::from_secs(1))
            .await
            .unwrap();
        first.state.inbound_qos2.insert(42);
        let r2 = r.clone();
        let second = tokio::spawn(async move {
            let (tx2, _rx2) = oneshot::channel();
            r2.attach("c", 2, 60, tx2, Duration::from_secs(5)).await
        });
        assert_eq!(rx1.await.unwrap(), Kick::TakenOver);
        // The old connection leaves: its detach is ignored, its state moves over.
        assert!(matches!(r.detach("c", 1, 60), Detached::TakenOver));
        drop(first);
        let second = second.await.unwrap().unwrap();
        assert!(second.existed);
        assert!(second.state.inbound_qos2.contains(&42));
    }

    #[tokio::test]
    async fn takeover_of_an_expiry_zero_session_starts_afresh() {
        let r = Registry::new(10, 1000);
        let (tx1, _rx1) = oneshot::channel();
        let first = r
            .attach("c", 1, 0, tx1, Duration::from_secs(1))
            .await
            .unwrap();
        drop(first);
        // The first connection has not detached yet when the second arrives.
        let (tx2, _rx2) = oneshot::channel();
        let second = r
            .attach("c", 2, 60, tx2, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(!second.existed);
        assert!(matches!(r.detach("c", 1, 0), Detached::TakenOver));
    }

    #[tokio::test]
    async fn expiry_removes_only_detached_due_sessions() {
        let r = Registry::new(10, 1000);
        for (i, c) in ["a", "b", "c"].iter().enumerate() {
            let (tx, _rx) = oneshot::channel();
            drop(
                r.attach(c, i as u64, 60, tx, Duration::from_secs(1))
                    .await
                    .unwrap(),
            );
        }
        r.detach("a", 0, 1);
        r.detach("b", 1, u32::MAX);
        let later = Instant::now() + Duration::from_secs(2);
        let expired = r.take_expired(later);
        assert_eq!(expired.len(), 1);
        assert_eq!(&*expired[0].handle.client_id, "a");
        assert_eq!(counts(&r), (1, 1));
    }
}
