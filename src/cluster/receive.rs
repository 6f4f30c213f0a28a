//! Other nodes' messages, into this node: the durable consumer of the messages stream, the
//! core NATS subscription of QoS 0 messages, and the follower of the retained stream. Also
//! where the streams and buckets are created.
//!
//! A message from the stream is acknowledged to JetStream only after this node's own commit
//! of it (its place in persistent sessions' queues here) is done (a commit that failed is
//! counted where it failed, logged, and acknowledged all the same: holding the consumer back
//! would stop every later message too). So what JetStream acknowledged to a publisher on
//! another node reaches this node's subscribers even if this node's NATS connection, or the
//! node itself, drops in between: at least once, as QoS 1 allows. The consumer itself has
//! one replica by default and is made again elsewhere when its server goes
//! ([`NodeConsumer`]).

use super::sessions::Sequencer;
use super::{wire, ClusterError, Names};
use crate::broker::{Broker, Targets};
use crate::config::ClusterConfig;
use crate::storage::Commit;
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    kv,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use futures_util::StreamExt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the cluster's streams and buckets are.
pub(crate) struct Setup {
    pub(crate) msgs: jetstream::stream::Stream,
    pub(crate) retained: jetstream::stream::Stream,
    pub(crate) clients: kv::Store,
    pub(crate) nodes: kv::Store,
    pub(crate) sessions: kv::Store,
    pub(crate) wills: kv::Store,
    pub(crate) bridges: kv::Store,
}

/// Messages a node's consumer may hold unacknowledged (committing here, in flight to NATS).
const MAX_ACK_PENDING: i64 = 20_000;
/// When JetStream gives an unacknowledged message to the consumer again.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// Retries `f` until it succeeds or `deadline` passes: right after the NATS servers start,
/// JetStream may not have elected its meta leader yet.
pub(crate) async fn retry<T, E: std::fmt::Display, F, Fut>(
    what: &str,
    deadline: Instant,
    mut f: F,
) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    for attempt in 1u32.. {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() + Duration::from_millis(500) >= deadline => {
                return Err(ClusterError::JetStream(format!("{what}: {e}")))
            }
            Err(e) => {
                if attempt % 10 == 0 {
                    tracing::warn!(what, error = %e, "JetStream not ready; retrying");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Err(ClusterError::JetStream(format!("{what}: gave up")))
}

impl Setup {
    pub(crate) async fn create(
        api: &jetstream::Context,
        names: &Names,
        config: &ClusterConfig,
        deadline: Instant,
    ) -> Result<Setup, ClusterError> {
        let msgs = retry("messages stream", deadline, || {
            api.get_or_create_stream(stream::Config {
                name: names.msgs_stream.clone(),
                subjects: vec![format!("{}.msg.>", names.prefix)],
                storage: StorageType::File,
                num_replicas: config.replicas,
                retention: RetentionPolicy::Limits,
                discard: DiscardPolicy::Old,
                max_age: config.stream_max_age,
                max_bytes: i64::try_from(config.stream_max_bytes).unwrap_or(i64::MAX),
                duplicate_window: Duration::from_secs(120),
                description: Some("Tern: QoS 1/2 messages between nodes".to_string()),
                ..Default::default()
            })
        })
        .await?;
        let retained = retry("retained stream", deadline, || {
            api.get_or_create_stream(stream::Config {
                name: names.retained_stream.clone(),
                subjects: vec![format!("{}.ret.>", names.prefix)],
                storage: StorageType::File,
                num_replicas: config.replicas,
                max_messages_per_subject: 1,
                discard: DiscardPolicy::Old,
                duplicate_window: Duration::from_secs(120),
                description: Some("Tern: the retained message of each topic".to_string()),
                ..Default::default()
            })
        })
        .await?;
        let clients = bucket(api, &names.clients_bucket, config, Duration::ZERO, deadline).await?;
        let nodes = bucket(
            api,
            &names.nodes_bucket,
            config,
            config.heartbeat_ttl,
            deadline,
        )
        .await?;
        let sessions = bucket(
            api,
            &names.sessions_bucket,
            config,
            Duration::ZERO,
            deadline,
        )
        .await?;
        let wills = bucket(api, &names.wills_bucket, config, Duration::ZERO, deadline).await?;
        let bridges = bucket(
            api,
            &names.bridges_bucket,
            config,
            super::leases::LEASE_TTL,
            deadline,
        )
        .await?;
        Ok(Setup {
            bridges,
            msgs,
            retained,
            clients,
            nodes,
            sessions,
            wills,
        })
    }
}

/// A key-value bucket, made if missing (`max_age` zero: entries never expire).
async fn bucket(
    api: &jetstream::Context,
    name: &str,
    config: &ClusterConfig,
    max_age: Duration,
    deadline: Instant,
) -> Result<kv::Store, ClusterError> {
    retry(name, deadline, || async {
        match api.get_key_value(name).await {
            Ok(store) => Ok(store),
            Err(_) => api
                .create_key_value(kv::Config {
                    bucket: name.to_string(),
                    history: 1,
                    max_age,
                    storage: StorageType::File,
                    num_replicas: config.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string()),
        }
    })
    .await
}

/// This node's durable consumer of the messages stream: how it is made, found again at a
/// start, and made again where this node stopped reading.
///
/// It has `cluster.consumer_replicas` replicas, 1 by default. A replicated consumer puts
/// every delivery and every acknowledgement through its own Raft group: with three nodes
/// reading the stream, that is six more proposals per message besides the stream's own,
/// and on a small machine the NATS servers spent most of their CPU on them (the p99 of the
/// cluster's latency benchmark fell from 2.4 ms to about 1.1 ms without them). What the
/// replicas would protect is only this node's read position, and the node knows it: while
/// it runs, the stream sequence it routed last ([`Sequencer`]); after a restart, the
/// consumer's acknowledged floor, or, when the consumer's server is gone too, the anchors
/// of its persistent sessions (`anchors.rs`), the sessions that need what was published
/// meanwhile. So when the consumer stops answering (its NATS server died), the node deletes
/// it and makes it again on a server that answers, reading on from where it was
/// ([`FAILOVER`]).
pub(crate) struct NodeConsumer {
    pub(crate) stream: jetstream::stream::Stream,
    /// The durable name: the node's name.
    pub(crate) name: String,
    pub(crate) filter: String,
    pub(crate) replicas: usize,
}

/// How long the node consumer may fail to deliver (missed heartbeats, no answer) before it is
/// made again elsewhere. Longer than a replicated consumer's leader election (a few seconds),
/// so a consumer that would come back by itself is usually left to.
pub(crate) const FAILOVER: Duration = Duration::from_secs(5);

impl NodeConsumer {
    fn config(&self, deliver_policy: DeliverPolicy) -> pull::Config {
        pull::Config {
            durable_name: Some(self.name.clone()),
            deliver_policy,
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: MAX_ACK_PENDING,
            filter_subject: self.filter.clone(),
            num_replicas: self.replicas,
            description: Some(format!("Tern node {}", self.name)),
            ..Default::default()
        }
    }

    /// The consumer as the node starts, and the stream sequence up to which it has read
    /// everything: the existing consumer where it was acknowledged, a new one at the end of
    /// the stream for a new node. One made by another build or configuration (other replicas,
    /// ack policy) is made again where it was acknowledged. One that exists but does not
    /// answer for [`FAILOVER`] while the stream does (its only server is down) is made again
    /// after `fallback` (the lowest anchor of the persistent sessions restored here; None:
    /// there are none, nothing is owed from the past).
    pub(crate) async fn open(
        &self,
        deadline: Instant,
        fallback: impl Future<Output = Option<u64>>,
    ) -> Result<(jetstream::consumer::Consumer<pull::Config>, u64), ClusterError> {
        use jetstream::context::ConsumerInfoErrorKind as Kind;
        let mut unavailable: Option<Instant> = None;
        let mut fallback = Some(fallback);
        let mut from_anchors: Option<u64> = None;
        let mut attempt = 0u32;
        let err =
            |e: &dyn std::fmt::Display| ClusterError::JetStream(format!("node consumer: {e}"));
        loop {
            attempt += 1;
            let asked = Instant::now();
            // Bounded by FAILOVER: a consumer whose server is down makes the request time
            // out (the API's timeout is longer), and that is the answer.
            let info = tokio::time::timeout(FAILOVER, self.stream.consumer_info(&self.name))
                .await
                .unwrap_or_else(|_| {
                    Err(jetstream::context::ConsumerInfoError::new(Kind::TimedOut))
                });
            let failed = match info {
                Ok(info) => {
                    let floor = info.ack_floor.stream_sequence;
                    let c = &info.config;
                    if c.ack_policy == AckPolicy::Explicit
                        && c.num_replicas == self.replicas
                        && info.delivered.stream_sequence <= floor
                    {
                        match self.stream.get_consumer(&self.name).await {
                            Ok(consumer) => return Ok((consumer, floor)),
                            Err(e) => e.to_string(),
                        }
                    } else {
                        // Also when messages were delivered and not acknowledged (the node
                        // stopped before its commits were done): read again from the floor at
                        // once rather than after ACK_WAIT, and the floor stays exact for
                        // `consume`'s failover.
                        tracing::info!(node = %self.name, replicas = c.num_replicas, wanted = self.replicas, from = floor + 1, "node consumer made again where it was acknowledged");
                        match self.remake(floor + 1).await {
                            Ok(consumer) => return Ok((consumer, floor)),
                            Err(e) => e,
                        }
                    }
                }
                Err(e) if e.kind() == Kind::NotFound => {
                    // A new node: it reads what is published from now on.
                    match self.stream_end().await {
                        Some(from) => match self
                            .stream
                            .create_consumer(self.config(DeliverPolicy::ByStartSequence {
                                start_sequence: from,
                            }))
                            .await
                        {
                            Ok(consumer) => return Ok((consumer, from - 1)),
                            Err(e) => e.to_string(),
                        },
                        None => "no stream info".to_string(),
                    }
                }
                Err(e) => {
                    // JetStream answers for the stream but not for the consumer: the server
                    // that holds it is down.
                    let since = match self.stream.get_info().await {
                        Ok(_) => *unavailable.get_or_insert(asked),
                        Err(_) => {
                            unavailable = None;
                            Instant::now()
                        }
                    };
                    if since.elapsed() >= FAILOVER {
                        let from = match from_anchors {
                            Some(from) => from,
                            None => {
                                let low = match fallback.take() {
                                    Some(f) => f.await,
                                    None => None,
                                };
                                let from = match low {
                                    Some(low) => low + 1,
                                    None => self.stream_end().await.unwrap_or(1),
                                };
                                tracing::warn!(node = %self.name, from, error = %e, "node consumer unavailable; made again from the anchors of this node's sessions");
                                *from_anchors.insert(from)
                            }
                        };
                        match self.remake(from).await {
                            Ok(consumer) => return Ok((consumer, from - 1)),
                            Err(e) => e,
                        }
                    } else {
                        e.to_string()
                    }
                }
            };
            if Instant::now() + Duration::from_millis(500) >= deadline {
                return Err(err(&failed));
            }
            if attempt.is_multiple_of(10) {
                tracing::warn!(node = %self.name, error = %failed, "node consumer not ready; retrying");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Why the consumer is gone (it does not exist, or does not answer within [`FAILOVER`]
    /// while its stream does); None while it answers, or while nothing does (NATS itself
    /// out of reach: nothing can be made again then either).
    async fn gone(&self) -> Option<String> {
        use jetstream::context::ConsumerInfoErrorKind as Kind;
        let why = match tokio::time::timeout(FAILOVER, self.stream.consumer_info(&self.name)).await
        {
            Ok(Ok(_)) => return None,
            Ok(Err(e)) if e.kind() == Kind::NotFound => return Some(e.to_string()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".to_string(),
        };
        self.stream.get_info().await.ok().map(|_| why)
    }

    /// The next sequence the stream will give a message.
    async fn stream_end(&self) -> Option<u64> {
        self.stream
            .get_info()
            .await
            .ok()
            .map(|i| i.state.last_sequence + 1)
    }

    /// Deletes the consumer (wherever it is, also on a server that is down: JetStream's meta
    /// leader forgets it) and makes it again reading from stream sequence `from`.
    pub(crate) async fn remake(
        &self,
        from: u64,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, String> {
        if let Err(e) = self.stream.delete_consumer(&self.name).await {
            tracing::debug!(node = %self.name, error = %e, "node consumer delete");
        }
        self.stream
            .create_consumer(self.config(DeliverPolicy::ByStartSequence {
                start_sequence: from.max(1),
            }))
            .await
            .map_err(|e| e.to_string())
    }
}

/// Reads this node's consumer for good: routes each message from another node here, and
/// acknowledges it once this node's commit of it is done.
pub(crate) async fn consume(
    broker: Arc<Broker>,
    made: NodeConsumer,
    (mut consumer, floor): (jetstream::consumer::Consumer<pull::Config>, u64),
    node: String,
    sequencer: Arc<Sequencer>,
    seen: Arc<super::fast::Seen>,
) -> Result<JoinHandle<()>, ClusterError> {
    let (acks, pending) = tokio::sync::mpsc::unbounded_channel();
    let settled = Arc::new(AtomicU64::new(floor));
    tokio::spawn(acker(pending, settled.clone()));
    Ok(tokio::spawn(async move {
        // Since when the consumer has delivered nothing but errors (None: it works).
        let mut broken: Option<Instant> = None;
        loop {
            if broken.is_some_and(|t| t.elapsed() >= FAILOVER) {
                // Made again only when it is gone: a pull that stalled because this node was
                // too busy to read its heartbeats in time is no reason.
                match made.gone().await {
                    None => broken = None,
                    Some(why) => {
                        // Read on after the last message whose commit here is done: nothing
                        // lost, and nothing twice unless a commit was still running (they
                        // take milliseconds; this is seconds after the consumer stopped).
                        let from = settled.load(Ordering::Acquire) + 1;
                        match made.remake(from).await {
                            Ok(c) => {
                                tracing::warn!(%node, from, %why, "node consumer not answering; made again");
                                broker.metrics.cluster.consumer_remade.inc();
                                consumer = c;
                                broken = None;
                            }
                            Err(e) => {
                                tracing::warn!(%node, error = %e, "node consumer cannot be made again yet");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                continue;
                            }
                        }
                    }
                }
            }
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(1000)
                // A pull whose consumer lost its leader (a NATS server down) is noticed by the
                // missing heartbeats and asked again: a short beat makes that quick.
                .heartbeat(Duration::from_secs(1))
                .expires(Duration::from_secs(5))
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(%node, error = %e, "cannot read the node consumer; retrying");
                    broken.get_or_insert_with(Instant::now);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(item) = messages.next().await {
                let m = match item {
                    Ok(m) => {
                        broken = None;
                        m
                    }
                    Err(e) => {
                        tracing::debug!(%node, error = %e, "node consumer");
                        let since = *broken.get_or_insert_with(Instant::now);
                        if since.elapsed() >= FAILOVER {
                            break;
                        }
                        continue;
                    }
                };
                let own = wire::from_node(m.headers.as_ref(), &node);
                let Some(msgs) = wire::decode_all(
                    m.headers.as_ref(),
                    &m.payload,
                    || broker.next_message_id(),
                    own,
                ) else {
                    tracing::warn!(subject = %m.subject, "undecodable cluster message dropped");
                    let seq = m.info().map_or(0, |i| i.stream_sequence);
                    let _ = acks.send((Commit::Done, seq, m));
                    continue;
                };
                if !own {
                    broker.metrics.cluster.in_stream.inc_by(msgs.len() as u64);
                }
                // Routed to everyone else when it was published here, or to the sessions
                // here that did not take its fast copy when that came first (`fast.rs`,
                // `broker/early.rs`); persistent sessions take it now, in stream order (see
                // `sessions.rs`, "The seam").
                let early = if own {
                    None
                } else {
                    super::fast::has_fast_copy(m.headers.as_ref())
                        .and_then(|id| seen.stream(id, std::time::Instant::now()))
                };
                let seq = m.info().map_or(0, |i| i.stream_sequence);
                let commit = {
                    let mut position = sequencer.position.lock().await;
                    let commit = match early {
                        Some(batch) => broker.publish_stream_copy(&msgs, batch),
                        None if own => broker.publish_remote(&msgs, Targets::PersistentOnly),
                        None => broker.publish_remote(&msgs, Targets::All),
                    };
                    *position = (*position).max(seq);
                    sequencer.seen.store(*position, Ordering::Release);
                    commit
                };
                if !own {
                    // Routed: a fast copy of its sender's next batch may go now (`fast.rs`).
                    seen.streamed(wire::seq_of(m.headers.as_ref()), std::time::Instant::now());
                }
                // Acknowledged once this node's commit of it is done (`acker`).
                let _ = acks.send((commit, seq, m));
            }
        }
    }))
}

/// Acknowledges the node consumer's messages once this node's commits of them are done, in
/// stream order, each on its own. Not `AckPolicy::All` (one ack for everything before it,
/// tried in ac03163): when the server leading the stream dies, messages it had sent may never
/// arrive, and a later ack-all would acknowledge them unread (the cluster tests lost 4-19
/// acknowledged messages at such a kill). The channel is bounded by `max_ack_pending`.
/// `settled`: the stream sequence of the last message done with here (for [`consume`]'s
/// failover).
async fn acker(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(Commit, u64, jetstream::Message)>,
    settled: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(256);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        for (commit, seq, m) in batch.drain(..) {
            let stored = match commit {
                Commit::Done => true,
                Commit::Failed => false,
                Commit::Pending(rx) => rx.await.is_ok(),
            };
            if !stored {
                // Counted as storage_failed where it failed; the store is failing, and
                // holding the consumer back would stop every later message here too.
                tracing::error!(subject = %m.subject, "cluster message not stored here");
            }
            // The consume loop parsed the sequence already; the reply subject is not read twice.
            settled.fetch_max(seq, Ordering::AcqRel);
            if let Err(e) = m.ack().await {
                // Redelivered after ACK_WAIT, routed again: at least once.
                tracing::debug!(error = %e, "node consumer ack");
            }
        }
    }
}

/// Routes QoS 0 messages of other nodes here (core NATS: what is missed is gone, as QoS 0
/// allows).
pub(crate) async fn live(
    broker: Arc<Broker>,
    client: async_nats::Client,
    names: &Names,
    node: String,
) -> Result<JoinHandle<()>, ClusterError> {
    let mut sub = client
        .subscribe(format!("{}.live.>", names.prefix))
        .await
        .map_err(|e| ClusterError::JetStream(format!("subscribe: {e}")))?;
    Ok(tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if wire::from_node(m.headers.as_ref(), &node) {
                continue;
            }
            match wire::decode(&m.payload, broker.next_message_id(), false) {
                Some(msg) => {
                    broker.metrics.cluster.in_live.inc();
                    let _ = broker.publish_remote(std::slice::from_ref(&msg), Targets::All);
                }
                None => tracing::warn!(subject = %m.subject, "undecodable cluster message dropped"),
            }
        }
    }))
}

/// Loads the last retained message of every topic (waiting until all are applied, or
/// `deadline`), then follows the stream's changes for good. Every node applies the same
/// changes in the stream's order, its own included, so all converge on the same set.
pub(crate) async fn follow_retained(
    broker: Arc<Broker>,
    stream: &jetstream::stream::Stream,
    filter: String,
    deadline: Instant,
    node: String,
) -> Result<JoinHandle<()>, ClusterError> {
    let stream = stream.clone();
    let source = stream.clone();
    let open = move || {
        let stream = source.clone();
        let filter = filter.clone();
        async move {
            let consumer = stream
                .create_consumer(pull::OrderedConfig {
                    deliver_policy: DeliverPolicy::LastPerSubject,
                    filter_subject: filter,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            consumer.messages().await.map_err(|e| e.to_string())
        }
    };
    let mut messages = retry("retained follower", deadline, &open).await?;
    let existing = retry("retained stream info", deadline, || {
        let stream = stream.clone();
        async move { stream.get_info().await.map(|i| i.state.messages) }
    })
    .await?;
    let apply = |broker: &Broker, m: &jetstream::Message| match wire::decode(
        &m.payload,
        broker.next_message_id(),
        false,
    ) {
        Some(msg) => broker.apply_retained(&msg),
        None => tracing::warn!(subject = %m.subject, "undecodable retained message skipped"),
    };
    let mut loaded = 0u64;
    if existing > 0 {
        loop {
            let next = tokio::time::timeout_at(deadline, messages.next()).await;
            let m = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "retained follower");
                    continue;
                }
                Ok(None) | Err(_) => {
                    return Err(ClusterError::JetStream(format!(
                        "loading retained messages: {loaded} of {existing} before the deadline"
                    )))
                }
            };
            apply(&broker, &m);
            loaded += 1;
            if m.info().map_or(true, |i| i.pending == 0) {
                break;
            }
        }
    }
    tracing::info!(%node, retained = loaded, "retained messages loaded from the cluster");
    Ok(tokio::spawn(async move {
        loop {
            while let Some(item) = messages.next().await {
                match item {
                    Ok(m) => apply(&broker, &m),
                    Err(e) => tracing::debug!(error = %e, "retained follower"),
                }
            }
            // The ordered consumer ended (it recreates itself on gaps; this is rarer):
            // start again from the last of each topic, which re-applies the same values.
            tracing::warn!(%node, "retained follower restarting");
            tokio::time::sleep(Duration::from_secs(1)).await;
            match open().await {
                Ok(m) => messages = m,
                Err(e) => tracing::warn!(%node, error = %e, "retained follower"),
            }
        }
    }))
}
