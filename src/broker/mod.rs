//! The broker core: the subscription index, retained messages, and what happens to a message
//! between the connection that publishes it and the queues of the sessions that receive it.
//!
//! There is no router task. The publisher's own connection task calls [`Broker::publish`]:
//! it read-locks the subscription index (a `std` lock, never held across an await), collects
//! the targets into a reused `Vec`, releases the lock and pushes into each target's outbox
//! — a synchronous push that never waits. A slow subscriber slows nobody else.
//!
//! One file per concern, each an `impl Broker` block on the same struct:
//! - this file: the [`Broker`] itself, its limits, subscribe/unsubscribe, the end of a session;
//! - `route`: routing one message (`publish`), matching, No Local, overlapping subscriptions;
//! - `staged`: the durable routing step — a delivery to a persistent queue reserves its place
//!   and becomes visible when the store commits it ([`Staged`], [`After`]);
//! - [`shared`]: shared subscription groups, their queue and dispatcher, and their lifecycle
//!   (`shared::membership`);
//! - `spilled`: loading a session's on-disk queue into memory;
//! - `will`: wills, immediate and delayed;
//! - `peers`: the other nodes of a cluster, installed by `cluster/` ([`Peers`]);
//! - `expiry`: the once-a-second sweep (expired sessions, retained and queued messages);
//! - [`recovery`]: rebuilding sessions and groups from the store at startup;
//! - [`lag`]: consumer lag, the slowest sessions and groups for the status page;
//! - [`history`]: the last fifteen minutes, a point every five seconds, for the status page;
//! - [`trace`]: message traces, and the hooks' one-load cost when none is active;
//! - [`retain`], [`trie`], [`sys`], [`topics`]: the retained tree, the subscription index,
//!   `$SYS` and the per-topic sampler.

pub mod early;
mod expiry;
mod handover;
pub mod history;
pub mod lag;
mod peers;
pub mod recovery;
pub mod retain;
mod route;
pub mod shared;
mod spilled;
mod staged;
pub mod sys;
pub mod topics;
pub mod trace;
pub mod trie;
mod will;

pub use peers::{BoxFuture, Peers};
pub use route::{Routed, Targets};
pub use staged::{After, Staged};

use crate::auth::Authorizer;
use crate::config::{Config, Limits};
use crate::message::Message;
use crate::metrics::Metrics;
use crate::outbox::{Delivery, Pushed};
use crate::protocol::SubscriptionOptions;
use crate::session::registry::{Registry, SessionHandle};
use crate::session::SessionState;
use crate::storage::Op;
use crate::storage::Store;
use retain::RetainTree;
use shared::{Group, Groups};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use trie::Trie;

/// One entry of the subscription index.
#[derive(Clone)]
pub struct Subscriber {
    /// The session whose queue takes the message; for a shared subscription, the group's own
    /// queue.
    pub session: Arc<SessionHandle>,
    pub options: SubscriptionOptions,
    pub id: Option<u32>,
    /// Set for a shared subscription group's entry (one per group, not one per member).
    pub group: Option<Arc<Group>>,
}

pub struct Broker {
    /// The configuration the broker started with. `limits` may since have been reloaded:
    /// read them through [`Broker::limits`].
    pub config: Config,
    /// Current limits (SIGHUP may replace them); connections take a snapshot when they start.
    limits: RwLock<Arc<Limits>>,
    /// `sys_topics.interval` in seconds (0: off); a reload may change it.
    sys_interval: AtomicU64,
    /// `limits.backpressure`, read on every routed publish.
    backpressure: AtomicBool,
    pub registry: Registry,
    pub metrics: Metrics,
    pub store: Arc<dyn Store>,
    pub auth: Authorizer,
    pub groups: Groups,
    /// Per-topic message counts (sampled) for the status page.
    pub topic_sampler: topics::TopicSampler,
    /// The status page's charts: a point every five seconds (`history.rs`).
    pub history: history::History,
    subscriptions: RwLock<Trie<Subscriber>>,
    retained: RwLock<RetainTree>,
    next_message_id: AtomicU64,
    next_connection_id: AtomicU64,
    /// The other nodes, when this one is in a cluster (`peers.rs`).
    peers: std::sync::OnceLock<Arc<dyn Peers>>,
    /// Deliveries made before their message was stored (`early.rs`).
    pub early: early::EarlyLedger,
    /// Message traces (`trace.rs`): every hook first asks `tracer.active()`, one relaxed load.
    pub tracer: trace::Tracer,
}

/// The queue limits of clean and of persistent sessions. A persistent session's queue lives
/// on disk beyond a memory share (`outbox.rs`), so it may be longer; without a durable store it
/// would all be memory, and gets the clean sessions' limits.
fn queue_limits(limits: &Limits, durable: bool) -> ((usize, usize), (usize, usize)) {
    let clean = (limits.max_queued_messages, limits.max_queued_bytes);
    let persistent = if durable {
        (
            limits.max_queued_messages_persistent,
            limits.max_queued_bytes_persistent,
        )
    } else {
        clean
    };
    (clean, persistent)
}

impl Broker {
    pub fn new(
        config: Config,
        metrics: Metrics,
        store: Arc<dyn Store>,
        auth: Authorizer,
    ) -> Broker {
        Broker {
            registry: {
                let r = Registry::new(
                    config.limits.max_queued_messages,
                    config.limits.max_queued_bytes,
                );
                let (clean, persistent) = queue_limits(&config.limits, store.durable());
                r.set_queue_limits(clean, persistent);
                r
            },
            auth,
            groups: Groups::default(),
            topic_sampler: Default::default(),
            history: Default::default(),
            limits: RwLock::new(Arc::new(config.limits.clone())),
            backpressure: AtomicBool::new(config.limits.backpressure),
            sys_interval: AtomicU64::new(config.sys_topics.interval.as_secs()),
            config,
            metrics,
            store,
            subscriptions: RwLock::new(Trie::new()),
            retained: RwLock::new(RetainTree::default()),
            next_message_id: AtomicU64::new(1),
            next_connection_id: AtomicU64::new(1),
            peers: std::sync::OnceLock::new(),
            early: early::EarlyLedger::default(),
            tracer: trace::Tracer::default(),
        }
    }

    /// The limits now in force.
    pub fn limits(&self) -> Arc<Limits> {
        self.limits
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the limits (reload): broker-wide ones apply now, per-connection and
    /// per-session ones to connections and sessions made from now on.
    pub fn set_limits(&self, limits: Limits) {
        let (clean, persistent) = queue_limits(&limits, self.store.durable());
        self.registry.set_queue_limits(clean, persistent);
        self.backpressure
            .store(limits.backpressure, Ordering::Relaxed);
        *self.limits.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(limits);
    }

    pub fn sys_interval(&self) -> u64 {
        self.sys_interval.load(Ordering::Relaxed)
    }

    pub fn set_sys_interval(&self, seconds: u64) {
        self.sys_interval.store(seconds, Ordering::Relaxed);
    }

    /// Message ids continue above what the store has used.
    pub fn set_next_message_id(&self, next: u64) {
        self.next_message_id.fetch_max(next, Ordering::Relaxed);
    }

    /// Puts a retained message recovered from the store back into the tree.
    pub fn restore_retained(&self, msg: Arc<Message>) {
        self.retained
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .store(msg, usize::MAX);
    }

    pub fn next_message_id(&self) -> u64 {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn retained_count(&self) -> usize {
        self.retained
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Pushes into a session's outbox and counts a drop.
    pub fn push(&self, session: &SessionHandle, delivery: Delivery) -> Pushed {
        let pushed = if self.tracer.active() {
            self.tracer.push(session, delivery)
        } else {
            session.outbox.push(delivery)
        };
        if pushed == Pushed::DroppedFull {
            self.metrics.dropped_queue_full.inc();
        }
        pushed
    }

    /// Adds or replaces a subscription in the index; true if it replaced one.
    pub fn subscribe(
        &self,
        session: &Arc<SessionHandle>,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
    ) -> bool {
        let replaced = self
            .subscriptions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .subscribe(
                filter,
                session.id,
                Subscriber {
                    session: session.clone(),
                    options,
                    id,
                    group: None,
                },
            );
        // In a cluster: messages whose fast copy was routed before this subscription may
        // reach the session from their stream copies; no early delivery overtakes them
        // (`early.rs`). Read after the index changed, so a fast copy numbered later saw it.
        session.outbox.early_after(self.early.fast_mark());
        replaced
    }

    pub fn unsubscribe(&self, session: &SessionHandle, filter: &str) -> bool {
        self.subscriptions
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .unsubscribe(filter, session.id)
    }

    /// One page of the retained messages matching `filter`, live ones only, in topic order
    /// (the admin API's listing): see [`RetainTree::page`]. The tree is read-locked for one
    /// walk of the matches; what is kept is one page.
    pub fn retained_page(
        &self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<Arc<Message>>, bool) {
        self.retained
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .page(filter, after, limit, crate::clock::now())
    }

    /// Retained messages matching `filter`, live ones only.
    pub fn retained_for(&self, filter: &str, out: &mut Vec<Arc<Message>>) {
        self.retained
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .matching(filter, out);
        let now = crate::clock::now();
        out.retain(|m| !m.is_expired(now));
    }

    /// Takes the session's ordinary subscriptions out of the index (shared ones are their
    /// groups' business).
    fn unindex(&self, handle: &SessionHandle, state: &SessionState) {
        if state.subscriptions.is_empty() {
            return;
        }
        let mut subs = self
            .subscriptions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for filter in state.subscriptions.keys() {
            if shared::membership(filter).is_none() {
                subs.unsubscribe(filter, handle.id);
            }
        }
    }

    /// Removes every subscription of an ended session and empties its queue.
    pub fn end_session(self: &Arc<Self>, handle: &SessionHandle, state: &mut SessionState) {
        // Shared subscription groups first: what goes back to them is submitted before the
        // session's deletion drops its in-flight records.
        self.shared_member_gone(handle, state, true);
        if let Some(peers) = self.peers() {
            if handle.persistent.load(Ordering::Relaxed) {
                peers.session_ended(&handle.client_id);
            }
        }
        if self.store.durable() && handle.persistent.swap(false, Ordering::Relaxed) {
            // Fire and forget: nothing is acknowledged on the strength of a deletion, and the
            // storage thread applies it before anything submitted later.
            let _ = self.store.submit(vec![Op::DeleteSession {
                client_id: handle.client_id.to_string(),
                session_id: handle.id,
            }]);
        }
        self.unindex(handle, state);
        state.clear();
        handle.outbox.clear();
    }
}
