//! The connected client: this connection's protocol state and the session it holds while
//! attached. Every other file of the connection adds to `impl Client` what it is about (the
//! packet handlers in `handlers/`, deliveries in `outbound.rs`, the sans-IO API in `core.rs`,
//! ...); this one holds the struct, its construction, and the few facts they all ask of it.
//!
//! One struct rather than one per concern because the handlers of one packet touch most of it
//! (a PUBLISH reads the limits and aliases, updates the session state, queues an
//! acknowledgement behind a commit and counts itself), and the core is driven one call at a time
//! by one task, so nothing in it is shared or locked except the session state it owns.

use super::pending::{Gate, OpsCommit};
use super::responses::AckQueue;
use super::tally::Tally;
use super::throttle::PublishBudgets;
use crate::auth::chain::ClaimRules;
use crate::broker::shared::Group;
use crate::broker::{Broker, Subscriber};
use crate::config::{AclMode, Limits};
use crate::outbox::Delivery;
use crate::protocol::{ProtocolVersion, Will};
use crate::session::registry::SessionHandle;
use crate::session::{SessionState, TopicAliases};
use crate::storage::{Commit, Op};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::OwnedMutexGuard;

/// A connected client: protocol state of this connection plus the attached session.
pub(super) struct Client {
    pub(super) broker: Arc<Broker>,
    pub(super) version: ProtocolVersion,
    pub(super) client_id: Arc<str>,
    /// The authenticated username (or the TLS certificate identity), for authorisation.
    pub(super) username: Option<Arc<str>>,
    pub(super) clean_start: bool,
    pub(super) conn_id: u64,
    pub(super) handle: Arc<SessionHandle>,
    pub(super) state: OwnedMutexGuard<SessionState>,
    /// Keep Alive in effect, seconds (0: none).
    pub(super) keep_alive: u16,
    /// Session Expiry Interval in effect, seconds (`u32::MAX`: never).
    pub(super) session_expiry: u32,
    /// The Session Expiry Interval the client sent in CONNECT (0 forbids raising it later).
    pub(super) connect_expiry: u32,
    /// Boxed: most clients have none, and inline it would make every connection's task
    /// 200 bytes larger.
    pub(super) will: Option<Box<Will>>,
    /// Outbound window: min(limits.max_inflight, client's Receive Maximum).
    pub(super) window: usize,
    /// Client's Maximum Packet Size.
    pub(super) max_packet_out: usize,
    pub(super) aliases: TopicAliases,
    pub(super) acks: AckQueue,
    pub(super) scratch: Vec<Subscriber>,
    pub(super) batch: Vec<Delivery>,
    /// Per-connection tallies, added to the shared counters once per read or write batch
    /// rather than once per message (shared atomics are contended across cores).
    pub(super) tally: Tally,
    /// Durable bookkeeping of outbound messages, submitted once per batch.
    pub(super) pending_ops: Vec<Op>,
    /// Whether the last input routed a message to someone.
    pub(super) routed: bool,
    /// The last submit of `pending_ops`: delivering waits for it, so a subscriber draining a
    /// stored queue goes at the store's pace instead of piling work up in front of it.
    pub(super) ops_commit: OpsCommit,
    pub(super) gate: Gate,
    /// `limits.max_publish_rate` / `limits.max_publish_bytes_rate` budgets; None when neither
    /// is set. Boxed: most brokers set neither, and inline they would be in every idle
    /// connection's task.
    pub(super) publish_budgets: Option<Box<PublishBudgets>>,
    /// Shared subscription groups this session is a member of (their lanes are drained with
    /// the outbox).
    pub(super) groups: Vec<Arc<Group>>,
    /// A queue this client's last publish filled past the back-pressure threshold: reading
    /// pauses until it has drained to half.
    pub(super) pressure: Option<Arc<SessionHandle>>,
    /// Complete packets were left in the read buffer by a pause: handle them when it ends,
    /// whether or not the client sends anything more.
    pub(super) held_input: bool,
    /// The limits this connection was accepted with: its CONNACK announced them, so a reload
    /// applies to later connections only.
    pub(super) limits: Arc<Limits>,
    /// How this connection's listener checks a SUBSCRIBE against the ACL.
    pub(super) acl_mode: AclMode,
    /// What few connections have (a mount point, a token's rules and expiry). Boxed: inline
    /// it would make every connection's task larger.
    pub(super) extras: Option<Box<Extras>>,
    /// The time as the driver last told it (see `core.rs`): handlers never read a clock.
    pub(super) now: Instant,
    /// When the client last sent something (keep alive) and when we last wrote (write stall).
    pub(super) last_read: Instant,
    pub(super) last_write: Instant,
}

/// A connection's rarer settings.
#[derive(Default)]
pub(super) struct Extras {
    /// The listener's `mount_point`: added to the client's topics and filters, taken off
    /// the topics it receives.
    pub(super) mount: Option<Arc<str>>,
    /// Topic rules its credentials carry (a JWT's claims): they narrow the ACL's.
    pub(super) claims: Option<Arc<ClaimRules>>,
    /// When its credentials expire: the connection closes then (v5 0xA0).
    pub(super) expires_at: Option<Instant>,
    /// The authorisation service it asks about topics (`auth.http.acl_url`).
    pub(super) asking: Option<Box<super::asking::Asking>>,
}

impl Extras {
    pub(super) fn is_empty(&self) -> bool {
        self.mount.is_none()
            && self.claims.is_none()
            && self.expires_at.is_none()
            && self.asking.is_none()
    }

    /// Whether the credentials' rules let the client publish to `topic` (mounted).
    pub(super) fn may_publish(&self, topic: &str) -> bool {
        self.claims.as_ref().is_none_or(|c| c.can_publish(topic))
    }

    /// Whether the credentials' rules let the client subscribe to `filter` (mounted).
    pub(super) fn may_subscribe(&self, filter: &str) -> bool {
        self.claims.as_ref().is_none_or(|c| c.can_subscribe(filter))
    }

    /// Whether the credentials' rules let the client receive a message on `topic`.
    pub(super) fn may_receive(&self, topic: &str) -> bool {
        self.claims.as_ref().is_none_or(|c| c.can_receive(topic))
    }
}

impl Client {
    /// `topic` (or a filter) from the client, under its listener's mount point. `$` topics
    /// are the broker's and stay as they are.
    pub(super) fn mounted<'a>(&self, topic: &'a str) -> std::borrow::Cow<'a, str> {
        match self.extras.as_ref().and_then(|e| e.mount.as_deref()) {
            Some(m) if !topic.starts_with('$') => std::borrow::Cow::Owned(format!("{m}{topic}")),
            _ => std::borrow::Cow::Borrowed(topic),
        }
    }

    /// A topic on its way to the client, with its listener's mount point taken off.
    pub(super) fn unmounted<'a>(&self, topic: &'a str) -> &'a str {
        match self.extras.as_ref().and_then(|e| e.mount.as_deref()) {
            Some(m) => topic.strip_prefix(m).unwrap_or(topic),
            None => topic,
        }
    }

    pub(super) fn may_publish(&self, topic: &str) -> bool {
        self.extras.as_ref().is_none_or(|e| e.may_publish(topic))
    }

    pub(super) fn may_subscribe(&self, filter: &str) -> bool {
        self.extras.as_ref().is_none_or(|e| e.may_subscribe(filter))
    }

    pub(super) fn may_receive(&self, topic: &str) -> bool {
        self.extras.as_ref().is_none_or(|e| e.may_receive(topic))
    }

    /// When the credentials expire, if they do.
    pub(super) fn credentials_expire(&self) -> Option<Instant> {
        self.extras.as_ref().and_then(|e| e.expires_at)
    }
}

impl Client {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        broker: Arc<Broker>,
        version: ProtocolVersion,
        client_id: Arc<str>,
        clean_start: bool,
        conn_id: u64,
        handle: Arc<SessionHandle>,
        state: OwnedMutexGuard<SessionState>,
        keep_alive: u16,
        session_expiry: u32,
        connect_expiry: u32,
        will: Option<Box<Will>>,
        window: usize,
        max_packet_out: usize,
        aliases: TopicAliases,
        limits: Arc<Limits>,
    ) -> Client {
        let now = crate::clock::now();
        Client {
            broker,
            version,
            client_id,
            username: None,
            clean_start,
            conn_id,
            handle,
            state,
            keep_alive,
            session_expiry,
            connect_expiry,
            will,
            window,
            max_packet_out,
            aliases,
            acks: AckQueue::default(),
            scratch: Vec::new(),
            batch: Vec::new(),
            tally: Tally::default(),
            pending_ops: Vec::new(),
            routed: false,
            ops_commit: OpsCommit::default(),
            gate: Gate::default(),
            publish_budgets: PublishBudgets::new(
                limits.max_publish_rate,
                limits.max_publish_bytes_rate,
                now,
            ),
            groups: Vec::new(),
            pressure: None,
            held_input: false,
            limits,
            acl_mode: AclMode::default(),
            extras: None,
            now,
            last_read: now,
            last_write: now,
        }
    }

    /// Whether input since the last call routed a message to a subscriber.
    pub(super) fn take_routed(&mut self) -> bool {
        std::mem::take(&mut self.routed)
    }

    /// Whether this session's state goes to the durable store.
    pub(super) fn stores_session(&self) -> bool {
        stores_session(&self.broker, &self.handle)
    }

    /// Submits what the subscriber side staged (in-flight bookkeeping). Nothing is
    /// acknowledged on its strength, so nobody waits; the storage thread keeps the order.
    pub(super) fn flush_ops(&mut self) {
        if !self.pending_ops.is_empty() {
            let ops = std::mem::take(&mut self.pending_ops);
            if let Commit::Pending(rx) = self.broker.store.submit(ops) {
                // The store commits in submission order: the newest receiver covers the rest.
                if self.gate.needs_submit {
                    self.gate.needs_submit = false;
                    self.gate.commit = Some(rx);
                } else {
                    self.ops_commit.push(rx);
                }
            }
        }
    }
}

/// Whether `handle`'s session state goes to the durable store: the store keeps anything, and
/// the session was stored when it connected (`SessionHandle::persistent`: a Session Expiry
/// Interval above 0 at CONNECT). A free function for `Client::finish`, which has moved its
/// session state out by the time it asks.
pub(super) fn stores_session(broker: &Broker, handle: &SessionHandle) -> bool {
    broker.store.durable() && handle.persistent.load(std::sync::atomic::Ordering::Relaxed)
}
