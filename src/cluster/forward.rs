//! This node's messages, out to the others: one task, so they leave in the order they were
//! published (MQTT's ordering per topic and QoS holds across nodes), and one small waiter
//! per QoS 1/2 message that releases the publisher's acknowledgement once both this node's
//! commit and JetStream's replicated store are done.
//!
//! QoS 0 goes over core NATS: at most once is what QoS 0 promises, and it costs no store.
//! QoS 1/2 goes through the messages stream and nowhere else, so a QoS ≥ 1 message never
//! rides an at-most-once path: a node whose NATS connection drops reads it from its durable
//! consumer when it is back. A retained message of any QoS also goes to the retained stream,
//! where every node, including one started later, finds the last of each topic.
//!
//! Without quorum JetStream does not ack. The waiter publishes again (same deduplication id,
//! so JetStream stores it once) until `cluster.quorum_timeout` has passed since the publish,
//! then fails the commit: the publisher is refused, never acknowledged.

use super::{wire, Names};
use crate::broker::Broker;
use crate::message::Message;
use crate::metrics::ClusterMetrics;
use crate::protocol::MqttStr;
use crate::protocol::QoS;
use crate::storage::Commit;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use async_nats::HeaderMap;
use bytes::Bytes;
use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Messages waiting to be handed to NATS. Full means NATS takes nothing (a long disconnect):
/// QoS 0 is dropped (counted) and QoS 1/2 refused.
pub(crate) const CAPACITY: usize = 65_536;

/// Pause between publishes of a message JetStream did not ack.
const RETRY: Duration = Duration::from_millis(250);

pub(crate) struct Outgoing {
    msg: Arc<Message>,
    /// For QoS 1/2: this node's commit, and where to say the whole is done.
    gate: Option<(Commit, oneshot::Sender<()>)>,
}

/// Queues `msg` for the other nodes; returns the commit its publisher's ack waits for.
pub(crate) fn submit(
    out: &mpsc::Sender<Outgoing>,
    metrics: &ClusterMetrics,
    msg: &Arc<Message>,
    local: Commit,
) -> Commit {
    if msg.qos == QoS::AtMostOnce {
        let queued = out.try_send(Outgoing {
            msg: msg.clone(),
            gate: None,
        });
        if queued.is_err() {
            metrics.dropped_live.inc();
        }
        return local;
    }
    let (done, rx) = oneshot::channel();
    match out.try_send(Outgoing {
        msg: msg.clone(),
        gate: Some((local, done)),
    }) {
        Ok(()) => Commit::Pending(rx),
        Err(_) => {
            metrics.refused.inc();
            Commit::Failed
        }
    }
}

pub(crate) struct Forwarder {
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) names: Arc<Names>,
    pub(crate) node: String,
    pub(crate) boot: u64,
    pub(crate) quorum_timeout: Duration,
    pub(crate) broker: Arc<Broker>,
    /// Send all-QoS-1 batches over core NATS too (`cluster.fast_path`, `fast.rs`).
    pub(crate) fast_path: bool,
    /// A message taken from the queue and not yet handed to NATS (for a shutdown's drain).
    pub(crate) busy: Arc<std::sync::atomic::AtomicBool>,
    /// QoS 1/2 batches sent so far (each one's number, [`wire::SEQ`]).
    pub(crate) batches: std::sync::atomic::AtomicU64,
}

/// One JetStream publish, with what it takes to publish it again.
#[derive(Clone)]
struct Publish {
    js: jetstream::Context,
    subject: String,
    body: Bytes,
    headers: HeaderMap,
    id: String,
}

impl Publish {
    async fn send(&self) -> Option<PublishAckFuture> {
        self.js
            .send_publish(
                self.subject.clone(),
                PublishMessage::build()
                    .payload(self.body.clone())
                    .headers(self.headers.clone())
                    .message_id(&self.id),
            )
            .await
            .ok()
    }

    /// Whether JetStream stored it before `deadline`, publishing again as needed.
    async fn stored(self, mut attempt: Option<PublishAckFuture>, deadline: Instant) -> bool {
        loop {
            if let Some(ack) = attempt.take() {
                if let Ok(Ok(_)) = tokio::time::timeout_at(deadline, ack.into_future()).await {
                    return true;
                }
            }
            if Instant::now() + RETRY >= deadline {
                return false;
            }
            tokio::time::sleep(RETRY).await;
            attempt = self.send().await;
        }
    }
}

/// Marks the forwarder idle when one message is done with.
struct Idle(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Idle {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// QoS 1/2 messages of one topic crossing as one JetStream message (`wire.rs`).
struct Batch {
    msgs: Vec<(Arc<Message>, Commit, oneshot::Sender<()>)>,
    bytes: usize,
}

impl Batch {
    /// Nothing (a batch sent early leaves this in its place; `stream` skips it).
    fn empty() -> Batch {
        Batch {
            msgs: Vec::new(),
            bytes: 0,
        }
    }

    fn new(msg: Arc<Message>, local: Commit, done: oneshot::Sender<()>) -> Batch {
        let bytes = msg.weight();
        Batch {
            msgs: vec![(msg, local, done)],
            bytes,
        }
    }

    /// Whether a message of `weight` joins this batch: a batch stays within
    /// [`BATCH_MESSAGES`] and [`BATCH_BYTES`] (one larger message crosses alone).
    fn takes(&self, weight: usize) -> bool {
        self.msgs.len() < BATCH_MESSAGES && self.bytes + weight <= BATCH_BYTES
    }
}

/// Most messages in one batch: a shared group's node takes a batch whole, and its queue
/// should hold a few.
const BATCH_MESSAGES: usize = 128;
/// Most bytes of messages in one batch.
const BATCH_BYTES: usize = 64 * 1024;
/// Most messages taken from the queue in one go to form batches: only what is already
/// waiting is batched, nothing waits for a batch to fill (one message alone leaves at once).
const CHUNK: usize = 1024;
/// Fast copies (`fast.rs`) go only with a take of at most this many messages. More waiting
/// means this node publishes faster than it forwards: latency is then queueing, which a
/// fast copy does not shorten, while it doubles what every other node reads, over core NATS,
/// which has no flow control. A node that cannot read that fast is cut off by its
/// nats-server as a slow consumer (its pending data above `max_pending`), and what was on
/// its way through the stream then comes only after the consumer's ack wait. Under load the
/// stream alone, whose consumer pulls at the node's pace, carries the messages.
const FAST_TAKE: usize = 64;

impl Forwarder {
    pub(crate) async fn run(self, mut rx: mpsc::Receiver<Outgoing>) {
        let mut chunk = Vec::with_capacity(CHUNK);
        while let Some(first) = rx.recv().await {
            self.busy.store(true, std::sync::atomic::Ordering::Release);
            let _idle = Idle(self.busy.clone());
            chunk.push(first);
            while chunk.len() < CHUNK {
                match rx.try_recv() {
                    Ok(o) => chunk.push(o),
                    Err(_) => break,
                }
            }
            let fast = self.fast_path && chunk.len() <= FAST_TAKE;
            // One open batch per topic: a topic's messages leave in the order they came
            // (MQTT orders per topic); different topics' batches need no order between them.
            let mut open: Vec<Batch> = Vec::new();
            let mut by_topic: HashMap<MqttStr, usize> = HashMap::new();
            for Outgoing { msg, gate } in chunk.drain(..) {
                let Some((local, done)) = gate else {
                    if msg.retain {
                        // Its retained copy must not overtake a retained QoS 1/2 message of
                        // its topic still in a batch here: the retained stream's last message
                        // of a topic is the topic's retained message on every node.
                        if let Some(i) = by_topic.remove(&msg.topic) {
                            let waiting = std::mem::replace(&mut open[i], Batch::empty());
                            self.stream(waiting, fast).await;
                        }
                    }
                    self.live(msg).await;
                    continue;
                };
                match by_topic.get(&msg.topic) {
                    Some(&i) if open[i].takes(msg.weight()) => {
                        open[i].bytes += msg.weight();
                        open[i].msgs.push((msg, local, done));
                    }
                    Some(&i) => {
                        let full = std::mem::replace(&mut open[i], Batch::new(msg, local, done));
                        self.stream(full, fast).await;
                    }
                    None => {
                        by_topic.insert(msg.topic.clone(), open.len());
                        open.push(Batch::new(msg, local, done));
                    }
                }
            }
            for b in open {
                self.stream(b, fast).await;
            }
        }
    }

    /// A retained message's copy for the retained stream, sent.
    async fn retained(&self, msg: &Message, id: &str) -> (Publish, Option<PublishAckFuture>) {
        let p = Publish {
            js: self.js.clone(),
            subject: self.names.retained.topic(msg.topic.as_str()),
            body: wire::encode(msg),
            headers: wire::headers(&self.node),
            id: format!("{id}.r"),
        };
        let first = p.send().await;
        (p, first)
    }

    /// A QoS 0 message, over core NATS (its retained copy through the retained stream).
    async fn live(&self, msg: Arc<Message>) {
        let id = format!("{}.{}.{}", self.node, self.boot, msg.id);
        if msg.retain {
            let deadline = Instant::now() + self.quorum_timeout;
            let (p, first) = self.retained(&msg, &id).await;
            // Nobody waits for a QoS 0 retained update; it is kept when JetStream can.
            let broker = self.broker.clone();
            tokio::spawn(async move {
                if !p.stored(first, deadline).await {
                    broker.metrics.dropped_storage_failed.inc();
                }
            });
        }
        let subject = self.names.live.topic(msg.topic.as_str());
        if let Err(e) = self
            .client
            .publish_with_headers(subject, wire::headers(&self.node), wire::encode(&msg))
            .await
        {
            tracing::debug!(error = %e, "QoS 0 message not forwarded");
        }
    }

    /// A batch of QoS 1/2 messages of one topic, into the messages stream; each publisher's
    /// acknowledgement is released once its local commit, the stream's store and (retained)
    /// the retained stream's are done.
    /// `fast`: also send the batch's fast copy, if it qualifies.
    async fn stream(&self, batch: Batch, fast: bool) {
        let Some((head, _, _)) = batch.msgs.first() else {
            return;
        };
        let id = format!("{}.{}.{}", self.node, self.boot, head.id);
        let deadline = Instant::now() + self.quorum_timeout;
        let body = match batch.msgs.as_slice() {
            [(one, _, _)] => wire::encode(one),
            many => wire::encode_batch(&many.iter().map(|(m, _, _)| &**m).collect::<Vec<_>>()),
        };
        let fast = fast && batch.msgs.iter().all(|(m, _, _)| m.qos == QoS::AtLeastOnce);
        let mut headers = wire::batch_headers(&self.node, batch.msgs.len());
        let n = self
            .batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        headers.insert(
            wire::SEQ,
            format!("{}.{}.{n}", self.node, self.boot).as_str(),
        );
        if fast {
            // Tells the receivers to expect the fast copy (`fast.rs`).
            headers.insert(super::fast::MARK, "1");
        }
        let p = Publish {
            js: self.js.clone(),
            subject: self.names.msgs.topic(head.topic.as_str()),
            body,
            headers,
            id,
        };
        let cluster = &self.broker.metrics.cluster;
        if fast {
            // The same batch for the clean sessions of the other nodes, first: it is on its
            // way while JetStream stores the other copy (`fast.rs`).
            let mut headers = p.headers.clone();
            headers.insert(super::fast::ID, p.id.as_str());
            let subject = super::fast::subject(&self.names);
            match self
                .client
                .publish_with_headers(subject, headers, p.body.clone())
                .await
            {
                Ok(()) => cluster.out_fast.inc_by(batch.msgs.len() as u64),
                Err(e) => tracing::debug!(error = %e, "fast copy not sent"),
            }
        }
        let first = p.send().await;
        cluster.out_stream.inc_by(batch.msgs.len() as u64);
        cluster.stream_publishes.inc();
        let mut waiting = Vec::with_capacity(batch.msgs.len());
        for (msg, local, done) in batch.msgs {
            let retained = if msg.retain {
                let id = format!("{}.{}.{}", self.node, self.boot, msg.id);
                Some(self.retained(&msg, &id).await)
            } else {
                None
            };
            waiting.push((local, retained, done));
        }
        let broker = self.broker.clone();
        tokio::spawn(async move {
            let stored = p.stored(first, deadline).await;
            if !stored {
                broker.metrics.cluster.refused.inc_by(waiting.len() as u64);
            }
            for (local, retained, done) in waiting {
                let local_done = async {
                    match local {
                        Commit::Done => true,
                        Commit::Failed => false,
                        Commit::Pending(rx) => rx.await.is_ok(),
                    }
                };
                let retained_done = async {
                    match retained {
                        Some((r, first)) => r.stored(first, deadline).await,
                        None => true,
                    }
                };
                let (a, c) = tokio::join!(local_done, retained_done);
                if stored && a && c {
                    let _ = done.send(());
                } else if stored && !c {
                    broker.metrics.cluster.refused.inc();
                }
                // Otherwise `done` drops: the publisher is refused (see `responses.rs`).
            }
        });
    }
}
