//! Persistent sessions that follow their client from node to node.
//!
//! A client with a persistent session on node A connects to node B. Before B answers the
//! CONNACK, B asks A (the node its client-id claim names) for the session; A tells its
//! connection to leave (0x8E), takes the session out of its routing, and sends it whole as a
//! `SessionSnapshot` (subscriptions, in-flight deliveries with their packet ids, inbound QoS 2
//! ids, the queue); B stores it as the client's session and answers Session Present 1.
//!
//! **The seam.** Messages keep being published while the session moves; none may be lost
//! or doubled for it. QoS 1/2 deliveries to persistent sessions are made by each node's
//! consumer in the order of the messages stream (`Targets`, `broker/route.rs`), under
//! [`Sequencer::position`], which also records the stream sequence routed last. So:
//!
//! 1. A, holding its position lock, takes the session's subscriptions out of its index and
//!    notes its position `P_A`: the snapshot holds exactly the messages up to `P_A`.
//! 2. B waits until its own consumer has routed up to `P_A` (it reads the same stream), then,
//!    holding its position lock (its consumer pauses), installs the subscriptions and notes
//!    its position `P_B >= P_A`. It routes the messages `(P_A, P_B]` of the stream into this
//!    one session, reading them again from JetStream, before letting its consumer go on,
//!    which routes everything after `P_B` into the session like any other.
//!
//! Every stream message after `P_A` thus reaches the session once, on B, after the snapshot's
//! queue and in stream order. QoS 0 messages do not go through the stream; those published
//! during the move may miss the session (QoS 0 promises no more). An early delivery
//! (`broker/early.rs`: a fast copy handed over before its stream copy came) is made outside
//! this order, but only its stream copy stores it, in this order: one A made whose stream
//! copy is after `P_A` reaches the session again on B, a duplicate QoS 1 allows.
//!
//! **Failures.** A keeps the session (and its stored copy) until B says it has stored it
//! (`done`). Without that word within [`HANDOVER_TIMEOUT`], A puts the subscriptions back and
//! catches the session up from `P_A` the same way, unless the client id has meanwhile been
//! claimed by B (then the session is B's, and ends here). If A does not answer (it is down),
//! B starts a new session (Session Present 0): adopting a dead node's sessions is not built
//! yet (docs/cluster.md).
//!
//! The snapshot crosses in chunks of at most [`CHUNK`] bytes, so a queue larger than NATS'
//! `max_payload` still moves.

use super::anchors::Anchors;
use super::{claims, wire, Names};
use crate::broker::{Broker, Targets};
use crate::session::registry::SessionHandle;
use crate::session::SessionState;
use crate::storage::record::SessionSnapshot;
use crate::storage::Commit;
use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy, kv};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

/// Largest piece of a snapshot in one NATS message.
const CHUNK: usize = 512 * 1024;
/// How long a session taken over waits for this node's consumer to reach the snapshot's
/// position, before it starts here anyway (and may then get what lies between twice). Was
/// `cluster.quorum_timeout` (5 s in the tests): on a loaded 2-core CI machine a node's consumer
/// was once 142 stream messages (all 1,000 MQTT messages of a burst, batched) behind after 5 s,
/// and the moved session got every one twice. Its CONNACK waits this long at most.
const CONSUMER_CATCH_UP: Duration = Duration::from_secs(10);
/// How long the old node keeps a session it sent, waiting for the new node's `done`.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// When JetStream removes a catch-up's reading consumer left behind (this node died while
/// using it; otherwise it is deleted after use). Longer than any wait for the position lock:
/// in a reconnect storm on a slow machine the sessions queue there for seconds, and a
/// consumer made before the wait and gone by its end left its session without its messages
/// (CI, 2 of 2,000 storm clients).
const REPLAY_IDLE: Duration = Duration::from_secs(300);
/// How many consumers one catch-up may use, each going on where the last one stopped.
const CATCH_UP_ATTEMPTS: usize = 3;
/// How long a request between nodes waits for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the old node waits for the session's connection to let go.
const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// Header of a `take` answer: how many chunks the snapshot has (absent: no session here).
const CHUNKS: &str = "Tern-Chunks";

/// Where this node's consumer is in the messages stream, and the lock that holds it still.
#[derive(Default)]
pub(crate) struct Sequencer {
    /// The stream sequence routed last; held while a message is routed to persistent
    /// sessions, and while a session enters or leaves the index.
    pub(crate) position: tokio::sync::Mutex<u64>,
    /// The same number, for waiting without the lock.
    pub(crate) seen: AtomicU64,
}

/// A session this node sent, kept until the new node has stored it.
struct Sent {
    handle: Arc<SessionHandle>,
    state: OwnedMutexGuard<SessionState>,
    chunks: Vec<Bytes>,
    position: u64,
    deadline: Instant,
}

pub(crate) struct Sessions {
    pub(crate) broker: Arc<Broker>,
    pub(crate) client: async_nats::Client,
    pub(crate) msgs: jetstream::stream::Stream,
    pub(crate) names: Arc<Names>,
    pub(crate) node: String,
    pub(crate) sequencer: Arc<Sequencer>,
    pub(crate) clients: kv::Store,
    pub(crate) anchors: Arc<Anchors>,
    pub(crate) quorum_timeout: Duration,
    sent: Mutex<HashMap<String, Sent>>,
}

impl Sessions {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        broker: Arc<Broker>,
        client: async_nats::Client,
        msgs: jetstream::stream::Stream,
        names: Arc<Names>,
        node: String,
        sequencer: Arc<Sequencer>,
        clients: kv::Store,
        anchors: Arc<Anchors>,
        quorum_timeout: Duration,
    ) -> Sessions {
        Sessions {
            broker,
            client,
            msgs,
            names,
            node,
            sequencer,
            clients,
            anchors,
            quorum_timeout,
            sent: Mutex::new(HashMap::new()),
        }
    }

    fn subject(&self, node: &str, verb: &str) -> String {
        format!("{}.node.{node}.{verb}", self.names.prefix)
    }

    fn sent(&self) -> std::sync::MutexGuard<'_, HashMap<String, Sent>> {
        self.sent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers other nodes' requests for this node's sessions, for good; and gives back to
    /// routing what was sent and never confirmed.
    pub(crate) async fn serve(self: Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                this.expire_sent().await;
            }
        });
        loop {
            let mut sub = match self.client.subscribe(self.subject(&self.node, "*")).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot serve session handovers; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(m) = sub.next().await {
                let this = self.clone();
                tokio::spawn(async move { this.answer(m).await });
            }
        }
    }

    async fn answer(&self, m: async_nats::Message) {
        let Some(reply) = m.reply.clone() else { return };
        let verb = m.subject.rsplit('.').next().unwrap_or("");
        let text = String::from_utf8_lossy(&m.payload).into_owned();
        let (headers, body) = match verb {
            "take" => self.take(&text).await,
            "chunk" => {
                let (index, client_id) = text.split_once('\n').unwrap_or(("", ""));
                let chunk = index.parse::<usize>().ok().and_then(|i| {
                    self.sent()
                        .get(client_id)
                        .and_then(|s| s.chunks.get(i).cloned())
                });
                (HeaderMap::new(), chunk.unwrap_or_default())
            }
            "done" => {
                let sent = self.sent().remove(&text);
                if let Some(mut s) = sent {
                    self.broker.end_handed_over(&s.handle, &mut s.state);
                    tracing::info!(client_id = %text, "session handed over to another node");
                }
                (HeaderMap::new(), Bytes::from_static(b"ok"))
            }
            _ => return,
        };
        if let Err(e) = self.client.publish_with_headers(reply, headers, body).await {
            tracing::debug!(error = %e, "handover answer not sent");
        }
    }

    /// Sends `client_id`'s session: its first chunk, and how many there are.
    async fn take(&self, client_id: &str) -> (HeaderMap, Bytes) {
        let none = (HeaderMap::new(), Bytes::new());
        if let Some(s) = self.sent().get(client_id) {
            // Asked again (the first answer was lost): the same snapshot.
            let mut h = HeaderMap::new();
            h.insert(CHUNKS, s.chunks.len().to_string().as_str());
            return (h, s.chunks.first().cloned().unwrap_or_default());
        }
        let Some((handle, mut state)) = self
            .broker
            .registry
            .take_for_handover(client_id, RELEASE_WAIT)
            .await
        else {
            return none;
        };
        let position = {
            let position = self.sequencer.position.lock().await;
            self.broker.withdraw_session(&handle, &mut state);
            *position
        };
        let mut snap = match self.broker.export_session(&handle, &state).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(%client_id, error = %e, "session not handed over: cannot read its queue");
                self.reinstate(&handle, &state, position).await;
                return none;
            }
        };
        snap.position = position;
        let bytes = Bytes::from(snap.encode());
        let chunks: Vec<Bytes> = if bytes.is_empty() {
            vec![Bytes::new()]
        } else {
            bytes.chunks(CHUNK).map(|c| bytes.slice_ref(c)).collect()
        };
        let mut h = HeaderMap::new();
        h.insert(CHUNKS, chunks.len().to_string().as_str());
        let first = chunks.first().cloned().unwrap_or_default();
        self.sent().insert(
            client_id.to_string(),
            Sent {
                handle,
                state,
                chunks,
                position,
                deadline: Instant::now() + HANDOVER_TIMEOUT,
            },
        );
        (h, first)
    }

    /// Sessions sent and never confirmed go back into routing here, caught up on what they
    /// missed; unless the client id went to another node meanwhile (then they end).
    async fn expire_sent(&self) {
        let now = Instant::now();
        let expired: Vec<(String, Sent)> = {
            let mut sent = self.sent();
            let keys: Vec<String> = sent
                .iter()
                .filter(|(_, s)| s.deadline <= now)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| sent.remove(&k).map(|s| (k, s)))
                .collect()
        };
        for (client_id, mut s) in expired {
            if !self.broker.registry.is_detached(&client_id, s.handle.id) {
                self.broker.end_session(&s.handle, &mut s.state);
                continue;
            }
            tracing::warn!(%client_id, "session handover not confirmed: the session stays here");
            self.reinstate(&s.handle, &s.state, s.position).await;
        }
    }

    /// Puts a withdrawn session back into routing, caught up from `from`.
    async fn reinstate(&self, handle: &Arc<SessionHandle>, state: &SessionState, from: u64) {
        if !self.install_caught_up(handle, state, from).await {
            tracing::error!(client_id = %handle.client_id, "session put back without some of what it missed");
        }
    }

    /// Installs the session's subscriptions while this node's consumer is held still at its
    /// position `to`, and routes the stream's messages `(from, to]` into that one session
    /// first. False when the stream could not be read to `to`: the session then misses
    /// messages. The reading consumer (ephemeral, in memory) is made before the consumer is
    /// held and deleted after it is let go, so the hold lasts only for the reading: in a
    /// reconnect storm the sessions of a node take turns there. A session with one
    /// subscription reads only what it matches; several filters may overlap, which one
    /// consumer cannot have, so those read everything in range. A read that stops (its
    /// consumer gone, a pull unanswered) goes on after the last message it routed with a new
    /// consumer, a few times.
    async fn install_caught_up(
        &self,
        handle: &Arc<SessionHandle>,
        state: &SessionState,
        from: u64,
    ) -> bool {
        let mut filters = state
            .subscriptions
            .keys()
            .filter(|f| crate::broker::shared::membership(f).is_none());
        let filter_subject = match (filters.next(), filters.next()) {
            (None, _) => None,
            (Some(f), None) => Some(self.names.msgs.filter(f)),
            _ => Some(format!("{}.msg.>", self.names.prefix)),
        };
        // Made before the hold when there is already something to read (the usual case
        // after a node's death), inside it otherwise (rare: the stream moved meanwhile).
        let mut replay = None;
        if let Some(f) = &filter_subject {
            if self.sequencer.seen.load(Ordering::Acquire) > from {
                replay = self.open_replay(f, from).await;
            }
        }
        let mut used = Vec::new();
        let ok = {
            let position = self.sequencer.position.lock().await;
            if *position < from {
                tracing::warn!(client_id = %handle.client_id, behind = from - *position, "this node's consumer lags: the session may get some messages twice");
            }
            self.broker.install_subscriptions(handle, state);
            let to = *position;
            match filter_subject {
                None => true,
                Some(_) if to <= from => true,
                Some(f) => {
                    let mut after = from;
                    let mut done = false;
                    for attempt in 0..CATCH_UP_ATTEMPTS {
                        if attempt > 0 {
                            tracing::warn!(client_id = %handle.client_id, after, to, "session catch-up stopped; reading on with a new consumer");
                        }
                        let consumer = match replay.take() {
                            Some(c) => Some(c),
                            None => self.open_replay(&f, after).await,
                        };
                        let Some(c) = consumer else { continue };
                        let read = self.catch_up(&c, handle.id, to).await;
                        used.push(c);
                        match read {
                            CatchUp::Done => {
                                done = true;
                                break;
                            }
                            CatchUp::Stopped { last } => after = after.max(last),
                        }
                    }
                    done
                }
            }
        };
        used.extend(replay);
        for mut c in used {
            let name = c.cached_info().name.clone();
            let _ = c.info().await;
            let _ = self.msgs.delete_consumer(&name).await;
        }
        ok
    }

    /// A consumer reading the messages stream from after `after` through `filter_subject`,
    /// without acknowledgements, for one catch-up.
    async fn open_replay(
        &self,
        filter_subject: &str,
        after: u64,
    ) -> Option<jetstream::consumer::Consumer<pull::Config>> {
        self.msgs
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ack_policy: jetstream::consumer::AckPolicy::None,
                filter_subject: filter_subject.to_string(),
                num_replicas: 1,
                memory_storage: true,
                inactive_threshold: REPLAY_IDLE,
                ..Default::default()
            })
            .await
            .map_err(|e| tracing::warn!(error = %e, after, "session catch-up: no consumer"))
            .ok()
    }

    /// Reads `consumer` up to stream sequence `to` into session `session_id` alone.
    async fn catch_up(
        &self,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
        session_id: u64,
        to: u64,
    ) -> CatchUp {
        let mut last = 0;
        // Nothing of the session's in the stream from where it starts: nothing to wait for
        // (a pull with nothing to deliver would only end at its timeout, with the node's
        // consumer held meanwhile).
        match consumer.get_info().await {
            Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => return CatchUp::Done,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "session catch-up: consumer info");
                return CatchUp::Stopped { last };
            }
        }
        let Ok(mut messages) = consumer
            .stream()
            .max_messages_per_batch(512)
            .messages()
            .await
        else {
            return CatchUp::Stopped { last };
        };
        let mut routed = 0u64;
        loop {
            let m = match tokio::time::timeout(REQUEST_TIMEOUT, messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(_))) => continue,
                Ok(None) | Err(_) => {
                    tracing::warn!(to, last, routed, "session catch-up: the read stopped");
                    return CatchUp::Stopped { last };
                }
            };
            let Ok(info) = m.info() else { continue };
            let (seq, pending) = (info.stream_sequence, info.pending);
            if seq > to {
                break;
            }
            let own = wire::from_node(m.headers.as_ref(), &self.node);
            let next = || self.broker.next_message_id();
            if let Some(msgs) = wire::decode_all(m.headers.as_ref(), &m.payload, next, own) {
                let _ = self
                    .broker
                    .publish_remote(&msgs, Targets::Session(session_id));
                routed += msgs.len() as u64;
            }
            last = seq;
            if seq >= to || pending == 0 {
                break;
            }
        }
        tracing::debug!(to, routed, "session caught up");
        CatchUp::Done
    }

    /// Takes `client_id`'s session from the node that has it into `handle`'s session: by
    /// asking that node, or, when it is gone (nobody answers for it), from the session's
    /// anchor and the stream (`anchors.rs`). `None`: no other node had one.
    pub(crate) async fn take_session(
        &self,
        client_id: &str,
        handle: &Arc<SessionHandle>,
        state: &mut SessionState,
    ) -> Option<Commit> {
        let owner = match self.clients.get(claims::key(client_id)).await {
            Ok(Some(v)) => String::from_utf8_lossy(&v)
                .split('/')
                .next()
                .map(str::to_string)?,
            _ => return None,
        };
        if owner == self.node {
            return None;
        }
        let anchor = self.anchors.get(client_id).await;
        let ask = |verb: &'static str, payload: String| {
            let subject = self.subject(&owner, verb);
            async move {
                tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    self.client.request(subject, Bytes::from(payload)),
                )
                .await
            }
        };
        let (snap, low, adopted) = match ask("take", client_id.to_string()).await {
            Ok(Ok(first)) => {
                let n: usize = first.headers.as_ref()?.get(CHUNKS)?.as_str().parse().ok()?;
                let mut bytes = first.payload.to_vec();
                for i in 1..n {
                    let chunk = ask("chunk", format!("{i}\n{client_id}")).await.ok()?.ok()?;
                    bytes.extend_from_slice(&chunk.payload);
                }
                match SessionSnapshot::decode(&bytes) {
                    Ok(s) => (s, anchor.map_or(0, |a| a.low), false),
                    Err(e) => {
                        tracing::error!(%client_id, %owner, error = %e, "session from another node not readable: starting a new one");
                        return None;
                    }
                }
            }
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                // Its node is gone: rebuild the session from its anchor, the queue from the
                // stream (at least once).
                let a = anchor.filter(|a| a.node == owner)?;
                let snap = SessionSnapshot {
                    position: a.low,
                    subscriptions: a.subscriptions,
                    ..Default::default()
                };
                (snap, a.low, true)
            }
            // The node is there but did not answer in time: no second copy of the session
            // may start here. The CONNECT fails; the client tries again.
            _ => {
                tracing::warn!(%client_id, %owner, "the node holding the session did not answer");
                return Some(Commit::Failed);
            }
        };
        let from = snap.position;
        let staged = self.broker.import_session(handle, state, snap);
        let commit = self.broker.submit_staged(staged);
        // Our consumer reads the same stream: wait until it has routed what the snapshot
        // covers, so nothing up to `from` reaches the session twice.
        let deadline = Instant::now() + CONSUMER_CATCH_UP.max(self.quorum_timeout);
        while self.sequencer.seen.load(Ordering::Acquire) < from && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !self.install_caught_up(handle, state, from).await {
            tracing::error!(%client_id, from, "session taken over without some of what it missed (the stream could not be read)");
        }
        // The anchor names this node before the old one lets go.
        let client: Arc<str> = Arc::from(client_id);
        let subs = state.subscription_records();
        self.anchors.track(&client, subs.clone(), low);
        let anchored = self.anchors.put(&client, subs, Some(low));
        let stored = wait(commit).await && wait(anchored).await;
        if !stored {
            return Some(Commit::Failed);
        }
        if adopted {
            tracing::warn!(%client_id, from = %owner, "session adopted from a node that is gone (at least once from its last drained position)");
        } else {
            let _ = ask("done", client_id.to_string()).await;
            tracing::info!(%client_id, from = %owner, "session taken over from another node");
        }
        Some(Commit::Done)
    }
}

/// How a catch-up read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CatchUp {
    /// Everything up to the position was routed into the session.
    Done,
    /// The read stopped after routing stream sequence `last` (0: nothing): reading again
    /// from `last` on neither misses nor doubles.
    Stopped { last: u64 },
}

async fn wait(c: Commit) -> bool {
    match c {
        Commit::Done => true,
        Commit::Failed => false,
        Commit::Pending(rx) => rx.await.is_ok(),
    }
}

/// At startup, before the node's consumer runs: a session restored from this node's store
/// whose client id was claimed by another node meanwhile ends here (its client went on
/// there, and took or rebuilt the session); the others are anchored, so that another node
/// finds them should this one die.
pub(crate) async fn settle_restored(
    broker: &Arc<Broker>,
    clients: &kv::Store,
    anchors: &Arc<Anchors>,
    node: &str,
) {
    let mine = format!("{node}/");
    for h in broker.registry.handles() {
        if !h.persistent.load(Ordering::Relaxed) {
            continue;
        }
        let claimed_elsewhere = matches!(
            clients.get(claims::key(&h.client_id)).await,
            Ok(Some(v)) if !v.starts_with(mine.as_bytes())
        );
        if claimed_elsewhere {
            if let crate::session::registry::Moved::Ended(e) =
                broker.registry.moved(&h.client_id, None)
            {
                if let Ok(mut state) = e.state.try_lock() {
                    broker.end_session(&e.handle, &mut state);
                }
            }
            tracing::info!(client_id = %h.client_id, "session ended: its client went to another node while this one was down");
            continue;
        }
        // Its client id is this node's (a session imported by `tern cluster import` has no
        // claim yet): another node asks this one for it.
        let _ = clients
            .create(
                claims::key(&h.client_id),
                format!("{node}/0/{}", h.client_id).into(),
            )
            .await;
        let Some(state) = broker.registry.state_of(&h.client_id) else {
            continue;
        };
        let subs = match state.try_lock() {
            Ok(st) => st.subscription_records(),
            Err(_) => continue,
        };
        let low = match anchors.get(&h.client_id).await {
            Some(a) if a.node == node => a.low,
            _ => 0,
        };
        anchors.track(&h.client_id, subs.clone(), low);
        let _ = anchors.put(&h.client_id, subs, Some(low));
    }
}
