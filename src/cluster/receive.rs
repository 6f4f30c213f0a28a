//! Other nodes' messages, into this node: the durable consumer of the messages stream, the
//! core NATS subscription of QoS 0 messages, and the follower of the retained stream. Also
//! where the streams and buckets are created.
//!
//! A message from the stream is acknowledged to JetStream only after this node's own commit
//! of it (its place in persistent sessions' queues here) is done; a message this node could
//! not store is NAKed and comes again. So what JetStream acknowledged to a publisher on
//! another node reaches this node's subscribers even if this node's NATS connection, or the
//! node itself, drops in between: at least once, as QoS 1 allows.

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
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the cluster's streams, buckets and this node's consumer are.
pub(crate) struct Setup {
    pub(crate) msgs: jetstream::stream::Stream,
    pub(crate) consumer: jetstream::consumer::Consumer<pull::Config>,
    pub(crate) retained: jetstream::stream::Stream,
    pub(crate) clients: kv::Store,
    pub(crate) nodes: kv::Store,
    pub(crate) sessions: kv::Store,
    pub(crate) wills: kv::Store,
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
        let durable = config.node.clone();
        let node_consumer = || {
            msgs.get_or_create_consumer(
                &durable,
                pull::Config {
                    durable_name: Some(durable.clone()),
                    deliver_policy: DeliverPolicy::New,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_ack_pending: MAX_ACK_PENDING,
                    filter_subject: format!("{}.msg.>", names.prefix),
                    num_replicas: config.replicas,
                    description: Some(format!("Tern node {durable}")),
                    ..Default::default()
                },
            )
        };
        let mut consumer = retry("node consumer", deadline, node_consumer).await?;
        if consumer.cached_info().config.ack_policy != AckPolicy::Explicit {
            // Made by an earlier build that acked all (see `acker`). Made again, from now on.
            tracing::warn!(node = %durable, "node consumer made again (ack policy changed)");
            let _ = msgs.delete_consumer(&durable).await;
            consumer = retry("node consumer", deadline, node_consumer).await?;
        }
        Ok(Setup {
            msgs,
            consumer,
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

/// Reads this node's consumer for good: routes each message from another node here, and
/// acknowledges it once this node's commit of it is done.
pub(crate) async fn consume(
    broker: Arc<Broker>,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    node: String,
    sequencer: Arc<Sequencer>,
    seen: Arc<super::fast::Seen>,
) -> Result<JoinHandle<()>, ClusterError> {
    let (acks, pending) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(acker(pending));
    Ok(tokio::spawn(async move {
        loop {
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
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(item) = messages.next().await {
                let m = match item {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(%node, error = %e, "node consumer");
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
                    let _ = acks.send((Commit::Done, m));
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
                let _ = acks.send((commit, m));
            }
        }
    }))
}

/// Acknowledges the node consumer's messages once this node's commits of them are done, in
/// stream order, each on its own. Not `AckPolicy::All` (one ack for everything before it,
/// tried in ac03163): when the server leading the stream dies, messages it had sent may never
/// arrive, and a later ack-all would acknowledge them unread (the cluster tests lost 4-19
/// acknowledged messages at such a kill). The channel is bounded by `max_ack_pending`.
async fn acker(mut rx: tokio::sync::mpsc::UnboundedReceiver<(Commit, jetstream::Message)>) {
    let mut batch = Vec::with_capacity(256);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        for (commit, m) in batch.drain(..) {
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
