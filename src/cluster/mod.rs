//! Tern nodes as one broker over NATS JetStream (docs/cluster.md).
//!
//! A node keeps everything that is per connection local (sockets, codec, auth, its trie,
//! outboxes, in-flight windows) and shares, through NATS, what makes several nodes one
//! broker. Every promise that must outlive a node lives in a replicated JetStream stream,
//! never in a node's memory or in an asynchronous route table:
//!
//! | what | where in NATS | why |
//! |---|---|---|
//! | QoS 0 messages | core NATS, `P.live.m.<levels>` | at most once is allowed: no store, no ack |
//! | QoS 1/2 messages | stream `P_MSGS`, subjects `P.msg.>`, file storage, `replicas` copies | the publisher's PUBACK waits for JetStream's ack, given only once the stream's quorum has it |
//! | each node's read position | one durable pull consumer per node (`node`), not per subscription; one replica by default, made again on another server from where the node was when its server goes (`receive.rs`, `NodeConsumer`) | a node that was cut off or restarted resumes where it was; thousands of subscriptions cost no JetStream API calls (nats-server's own MQTT layer creates one consumer per subscription and times out under reconnect storms); no Raft round per delivery and acknowledgement |
//! | retained messages | stream `P_RETAINED`, one message per topic subject (`P.ret.m.<levels>`) | every node reads the last of each at start and follows the changes in stream order, so all nodes converge on the same retained set |
//! | who holds a client id | key-value bucket `P_clients`, key = SHA-256 of the client id | the bucket's revision orders concurrent CONNECTs on different nodes: the newest claim wins, older holders are taken over |
//! | shared subscription groups | a durable pull consumer per group (QoS 1/2) and a NATS queue group (QoS 0) | each message to one node; nodes pull as their group queue has room (`groups.rs`) |
//! | persistent sessions | on the node their client is connected to; moved whole (a snapshot, in chunks, by request between nodes) when it connects elsewhere | the seam is cut at a position in the messages stream, so nothing is lost or doubled (`sessions.rs`) |
//! | where a session is found if its node dies | key-value bucket `P_sessions`: node, subscriptions and a stream position per persistent session | another node rebuilds it from there (`anchors.rs`) |
//! | wills of connected clients | key-value bucket `P_wills`, one copy per connection with a will, gone when it closes | a copy left behind by a dead node is published by a survivor (`wills.rs`) |
//! | which nodes are up | key-value bucket `P_nodes`, a heartbeat per node that expires | quorum health for this node, and the members for operators |
//! | declared queues | a durable pull consumer per queue, made when it is declared | one queue across the nodes; nodes with connected consumers pull from it (`groups.rs`) |
//! | where a bridge runs | key-value bucket `P_bridges`, a lease per bridge that expires | one node at a time runs it; another takes over when it dies (`leases.rs`) |
//!
//! `P` is `cluster.prefix`. Message bodies cross nodes in the storage record format
//! (`storage::record::StoredMessage`: versioned, properties and expiry included), so nodes of
//! different releases read each other's messages as they read old data directories.
//!
//! Files: `subject.rs` maps topics and filters to subjects; `wire.rs` the message envelope;
//! `forward.rs` sends this node's messages out, in publish order, and gates acknowledgements
//! on JetStream's acks; `receive.rs` routes other nodes' messages here and follows the
//! retained stream; `claims.rs` keeps client ids unique across the cluster; `groups.rs`
//! makes the members of a shared subscription on every node one group; `sessions.rs` moves a
//! persistent session to the node its client connects to.

mod admin;
pub use admin::AdminHandler;
mod anchors;
mod claims;
mod fast;
mod forward;
mod groups;
mod leases;
mod receive;
mod sessions;
pub mod subject;
mod wills;
mod wire;

use crate::broker::shared::Group;
use crate::broker::{BoxFuture, Broker, Peers};
use crate::config::ClusterConfig;
use crate::message::Message;
use crate::protocol::Will;
use crate::session::registry::SessionHandle;
use crate::session::SessionState;
use crate::storage::record::SubscriptionRecord;
use crate::storage::Commit;
use async_nats::jetstream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use subject::Subjects;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Why a node could not join its cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {urls}: {message}")]
    Connect { urls: String, message: String },
    #[error(
        "NATS max_payload is {max_payload} bytes, below limits.max_packet_size ({max_packet}) \
         plus {overhead} bytes of envelope: raise max_payload in the nats-server configuration \
         (e.g. `max_payload: 8MB`) or lower limits.max_packet_size"
    )]
    MaxPayload {
        max_payload: usize,
        max_packet: u32,
        overhead: usize,
    },
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("cluster.prefix: {0}")]
    Prefix(String),
    #[error(
        "{dir} holds a single-node store ({what}); a cluster node starts from its own: import \
         it with `tern cluster import --config FILE` (its retained messages go to the cluster, \
         its sessions stay on this node), or move the directory away"
    )]
    SingleNodeStore { dir: String, what: String },
    #[error("{dir} belongs to {owner}, not to node {node} of cluster prefix {prefix}: set storage.dir to this node's own directory")]
    ForeignStore {
        dir: String,
        owner: String,
        node: String,
        prefix: String,
    },
    #[error("{0}: {1}")]
    Marker(String, std::io::Error),
}

/// How [`Node::join`] treats a data directory without a cluster marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinMode {
    /// Refuse one that holds state (a single-node store).
    Serve,
    /// `tern cluster import`: take its retained messages into the cluster, then mark it.
    Import,
}

/// The file in `storage.dir` that says which node of which cluster the directory is.
const MARKER: &str = "CLUSTER";

/// What a node's data directory says about itself: `Ok(true)` when it is this node's (or
/// new, and now marked so), `Ok(false)` when it holds a single-node store and `mode` is
/// `Import` (the caller imports, then calls [`mark`]).
fn check_marker(
    dir: &std::path::Path,
    config: &ClusterConfig,
    held: Option<String>,
    mode: JoinMode,
) -> Result<bool, ClusterError> {
    let path = dir.join(MARKER);
    let want = format!("prefix={}\nnode={}\n", config.prefix, config.node);
    match std::fs::read_to_string(&path) {
        Ok(found) if found == want => return Ok(true),
        Ok(found) => {
            return Err(ClusterError::ForeignStore {
                dir: dir.display().to_string(),
                owner: found.trim().replace('\n', " "),
                node: config.node.clone(),
                prefix: config.prefix.clone(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ClusterError::Marker(path.display().to_string(), e)),
    }
    match (held, mode) {
        (Some(what), JoinMode::Serve) => Err(ClusterError::SingleNodeStore {
            dir: dir.display().to_string(),
            what,
        }),
        (Some(_), JoinMode::Import) => Ok(false),
        (None, _) => {
            mark(dir, config)?;
            Ok(true)
        }
    }
}

fn mark(dir: &std::path::Path, config: &ClusterConfig) -> Result<(), ClusterError> {
    let path = dir.join(MARKER);
    let want = format!("prefix={}\nnode={}\n", config.prefix, config.node);
    std::fs::write(&path, want).map_err(|e| ClusterError::Marker(path.display().to_string(), e))
}

/// Bytes a message's envelope may add to its packet (ids, lengths, expiry, origin): a
/// packet of `max_packet_size` must still fit in one NATS message with its headers.
const ENVELOPE_OVERHEAD: usize = 4096;

/// The subjects of one cluster (`cluster.prefix`).
pub(crate) struct Names {
    /// QoS 0 messages, core NATS.
    pub(crate) live: Subjects,
    /// QoS 1/2 messages, the `msgs` stream.
    pub(crate) msgs: Subjects,
    /// Retained messages, the `retained` stream.
    pub(crate) retained: Subjects,
    pub(crate) msgs_stream: String,
    pub(crate) retained_stream: String,
    pub(crate) clients_bucket: String,
    pub(crate) nodes_bucket: String,
    pub(crate) sessions_bucket: String,
    pub(crate) wills_bucket: String,
    pub(crate) bridges_bucket: String,
    pub(crate) prefix: String,
}

impl Names {
    fn new(prefix: &str) -> Result<Names, ClusterError> {
        let sub = |space: &str| {
            Subjects::new(&format!("{prefix}.{space}"))
                .map_err(|e| ClusterError::Prefix(e.to_string()))
        };
        let upper = prefix.to_ascii_uppercase();
        Ok(Names {
            live: sub("live")?,
            msgs: sub("msg")?,
            retained: sub("ret")?,
            msgs_stream: format!("{upper}_MSGS"),
            retained_stream: format!("{upper}_RETAINED"),
            clients_bucket: format!("{prefix}_clients"),
            nodes_bucket: format!("{prefix}_nodes"),
            sessions_bucket: format!("{prefix}_sessions"),
            wills_bucket: format!("{prefix}_wills"),
            bridges_bucket: format!("{prefix}_bridges"),
            prefix: prefix.to_string(),
        })
    }
}

/// This node's membership of the cluster: what the broker calls through [`Peers`].
pub struct Node {
    name: String,
    broker: Arc<Broker>,
    out: mpsc::Sender<forward::Outgoing>,
    claims: Arc<claims::Claims>,
    groups: Arc<groups::ClusterGroups>,
    sessions: Arc<sessions::Sessions>,
    anchors: Arc<anchors::Anchors>,
    sequencer: Arc<sessions::Sequencer>,
    wills: Arc<wills::Wills>,
    /// The forwarder holds a message not yet handed to NATS.
    busy: Arc<AtomicBool>,
    client: async_nats::Client,
    /// The last heartbeat reached JetStream's quorum (see [`Node::available`]).
    available: Arc<AtomicBool>,
    leases: Arc<leases::Leases>,
    /// `cluster.prefix`: the admin requests' subject is under it (`admin.rs`).
    prefix: String,
    /// What this node answers admin requests with, once `serve_admin` is called.
    admin: std::sync::OnceLock<AdminHandler>,
}

/// A joined node and the tasks that keep it in the cluster.
pub struct Joined {
    pub node: Arc<Node>,
    pub tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Connects to NATS, makes sure the streams and buckets exist, starts this node's
    /// consumer and the retained follower (waiting until the retained messages are loaded),
    /// and installs the node in the broker. Fails when NATS cannot be reached within
    /// `cluster.connect_timeout`. `held` names what the node's store recovered (sessions,
    /// retained messages), if anything: a store with state and no cluster marker is a
    /// single-node store, refused unless `mode` is [`JoinMode::Import`].
    pub async fn join(
        broker: &Arc<Broker>,
        config: &ClusterConfig,
        held: Option<String>,
        mode: JoinMode,
    ) -> Result<Joined, ClusterError> {
        let marked = if broker.store.durable() {
            check_marker(&broker.config.storage.dir, config, held, mode)?
        } else {
            true
        };
        let names = Arc::new(Names::new(&config.prefix)?);
        let client = tokio::time::timeout(config.connect_timeout, connect(config, false))
            .await
            .map_err(|_| ClusterError::Connect {
                urls: config.nats.join(","),
                message: format!(
                    "no answer within cluster.connect_timeout ({} s)",
                    config.connect_timeout.as_secs()
                ),
            })??;
        let max_payload = client.server_info().max_payload;
        let max_packet = broker.config.limits.max_packet_size;
        if max_payload < max_packet as usize + ENVELOPE_OVERHEAD {
            return Err(ClusterError::MaxPayload {
                max_payload,
                max_packet,
                overhead: ENVELOPE_OVERHEAD,
            });
        }
        let api = jetstream::ContextBuilder::new()
            .timeout(config.connect_timeout.min(Duration::from_secs(10)))
            .build(client.clone());
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let setup = receive::Setup::create(&api, &names, config, deadline).await?;
        let available = Arc::new(AtomicBool::new(true));
        let publisher = jetstream::ContextBuilder::new()
            .timeout(config.quorum_timeout)
            // A publish whose ack is lost (its stream leader died) is sent again after this,
            // with the same dedup id, until quorum_timeout (`forward.rs`): JetStream elects a
            // new leader within 4 to 9 s, and waiting the whole quorum_timeout for one lost
            // ack refused publishes the new leader would have stored.
            .ack_timeout(
                (config.quorum_timeout / 4)
                    .clamp(Duration::from_millis(250), Duration::from_secs(2)),
            )
            .max_ack_inflight(65_536)
            .build(client.clone());
        let claims = Arc::new(claims::Claims::new(
            broker.clone(),
            config.node.clone(),
            setup.clients.clone(),
            available.clone(),
            config.quorum_timeout,
        ));
        let echo = tokio::time::timeout(config.connect_timeout, connect(config, true))
            .await
            .map_err(|_| ClusterError::Connect {
                urls: config.nats.join(","),
                message: "no answer within cluster.connect_timeout".to_string(),
            })??;
        let groups = Arc::new(groups::ClusterGroups {
            broker: broker.clone(),
            echo,
            msgs: setup.msgs.clone(),
            names: names.clone(),
            replicas: config.replicas,
            idle: config.stream_max_age,
            running: Default::default(),
            held: Default::default(),
            feeds: Default::default(),
        });
        let mut tasks = vec![tokio::spawn(groups.clone().keep_alive())];
        let (out, rx) = mpsc::channel(forward::CAPACITY);
        let busy = Arc::new(AtomicBool::new(false));
        tasks.push(tokio::spawn(
            forward::Forwarder {
                client: client.clone(),
                js: publisher,
                names: names.clone(),
                node: config.node.clone(),
                boot: boot_id(),
                quorum_timeout: config.quorum_timeout,
                broker: broker.clone(),
                fast_path: config.fast_path,
                busy: busy.clone(),
                batches: Default::default(),
            }
            .run(rx),
        ));
        if !marked {
            let n = import_retained(broker, &api, &names, &config.node).await?;
            mark(&broker.config.storage.dir, config)?;
            tracing::info!(retained = n, "single-node store imported into the cluster");
        }
        // Retained first: a client connecting once the node is ready sees them all.
        let retained = receive::follow_retained(
            broker.clone(),
            &setup.retained,
            format!("{}.ret.>", names.prefix),
            deadline,
            config.node.clone(),
        )
        .await?;
        tasks.push(retained);
        let (anchors, writer) = anchors::Anchors::new(config.node.clone(), setup.sessions.clone());
        tasks.push(tokio::spawn(writer));
        // Sessions restored from this node's store: those whose client went to another node
        // while this one was down end here; the others get (or keep) their anchor. Before the
        // consumer starts, so an ended session takes nothing more from the stream.
        sessions::settle_restored(broker, &setup.clients, &anchors, &config.node).await;
        tasks.push(tokio::spawn(anchors.clone().sweep(broker.clone())));
        let wills = Arc::new(wills::Wills {
            broker: broker.clone(),
            kv: setup.wills.clone(),
            nodes: setup.nodes.clone(),
            node: config.node.clone(),
            heartbeat_ttl: config.heartbeat_ttl,
            removing: Default::default(),
            available: available.clone(),
            quorum_timeout: config.quorum_timeout,
            members: std::sync::RwLock::new(vec![config.node.clone()]),
        });
        // Our previous run's connections ended when it stopped: their wills go out now.
        wills.reap(&config.node).await;
        tasks.push(tokio::spawn(wills.clone().watch_nodes()));
        let sequencer = Arc::new(sessions::Sequencer::default());
        let seen = Arc::new(fast::Seen::default());
        tasks.push(
            fast::receive(
                broker.clone(),
                client.clone(),
                &names,
                config.node.clone(),
                seen.clone(),
            )
            .await?,
        );
        // This node's consumer, opened only now: if the server holding it is gone, it is made
        // again from the anchors of the sessions settled above.
        let made = receive::NodeConsumer {
            stream: setup.msgs.clone(),
            name: config.node.clone(),
            filter: format!("{}.msg.>", names.prefix),
            replicas: config.consumer_replicas,
        };
        let opened = made
            .open(deadline, restored_low(broker, &anchors, &config.node))
            .await?;
        tasks.push(
            receive::consume(
                broker.clone(),
                made,
                opened,
                config.node.clone(),
                sequencer.clone(),
                seen,
            )
            .await?,
        );
        let sessions = Arc::new(sessions::Sessions::new(
            broker.clone(),
            client.clone(),
            setup.msgs.clone(),
            names.clone(),
            config.node.clone(),
            sequencer.clone(),
            setup.clients.clone(),
            anchors.clone(),
            config.quorum_timeout,
        ));
        tasks.push(tokio::spawn(sessions.clone().serve()));
        tasks.push(
            receive::live(broker.clone(), client.clone(), &names, config.node.clone()).await?,
        );
        tasks.push(tokio::spawn(claims.clone().watch()));
        // Ready means a durable promise can be made: the first heartbeat must reach quorum.
        // Right after the streams are created their leaders may not be elected yet, and a
        // client refused with 0x88 in the first second of a node's life would be a lie.
        receive::retry("first heartbeat", deadline, || {
            setup
                .nodes
                .put(&config.node, bytes::Bytes::from_static(b"up"))
        })
        .await?;
        // And the buckets written on a client's behalf take a write through this node's
        // connection. Right after the NATS cluster forms, the server this node talks to may
        // not know a new bucket's subjects yet ("no stream found for given subject"), and a
        // CONNECT in the node's first second was closed for a claim or anchor not stored. The
        // write is a delete of a key no client id maps to (claims are SHA-256 hex): readers
        // skip deletes.
        for (what, kv) in [
            ("clients bucket", &setup.clients),
            ("sessions bucket", &setup.sessions),
            ("wills bucket", &setup.wills),
            ("bridges bucket", &setup.bridges),
        ] {
            receive::retry(what, deadline, || kv.delete(PROBE_KEY)).await?;
        }
        broker.metrics.cluster.available.set(1);
        tasks.push(tokio::spawn(heartbeat(
            broker.clone(),
            setup.nodes,
            config.node.clone(),
            available.clone(),
            config.quorum_timeout,
            config.heartbeat_ttl,
        )));
        let node = Arc::new(Node {
            name: config.node.clone(),
            broker: broker.clone(),
            out,
            claims,
            groups: groups.clone(),
            sessions,
            anchors,
            sequencer,
            wills,
            busy,
            client: client.clone(),
            available,
            leases: Arc::new(leases::Leases {
                kv: setup.bridges.clone(),
                node: config.node.clone(),
                held: Default::default(),
            }),
            prefix: names.prefix.clone(),
            admin: std::sync::OnceLock::new(),
        });
        broker.set_peers(node.clone());
        // Groups restored from the store before the node joined.
        for group in broker.groups.all() {
            groups.start(&group);
        }
        tracing::info!(
            node = %config.node,
            nats = %client.server_info().server_name,
            replicas = config.replicas,
            "joined the cluster"
        );
        Ok(Joined { node, tasks })
    }

    /// Whether JetStream took this node's last heartbeat: false while the cluster has no
    /// quorum (or this node cannot reach it), when a durable promise cannot be made.
    pub fn available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }
}

impl Peers for Node {
    fn node(&self) -> &str {
        &self.name
    }

    fn forward(&self, msg: &Arc<Message>, local: Commit) -> Commit {
        forward::submit(&self.out, &self.broker.metrics.cluster, msg, local)
    }

    fn claim(&self, client_id: &Arc<str>, conn_id: u64) -> Commit {
        self.claims.claim(client_id, conn_id)
    }

    fn release(&self, client_id: &str, conn_id: u64, delayed: bool) {
        self.claims.release(client_id, conn_id);
        if delayed {
            self.wills.closed_with_delay(client_id, conn_id);
        } else {
            self.wills.remove(client_id, conn_id);
        }
    }

    fn will_settled(&self, client_id: &str) {
        self.wills.settled(client_id);
    }

    fn will_cancelled(&self, client_id: &str) {
        self.wills.cancelled(client_id);
    }

    fn store_will(&self, client_id: &str, conn_id: u64, will: &Will) -> Commit {
        self.wills.put(client_id, conn_id, will)
    }

    fn available(&self) -> bool {
        Node::available(self)
    }

    fn group_started(&self, group: &Arc<Group>) {
        self.groups.start(group);
    }

    fn group_ended(&self, group: &Arc<Group>) {
        self.groups.end(group);
    }

    fn group_ready(&self, group: &Arc<Group>) -> Commit {
        self.groups.ready(group)
    }

    fn group_done(&self, msg_id: u64) {
        self.groups.done(msg_id);
    }

    fn bridge_lease<'a>(&'a self, name: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(self.leases.hold(name))
    }

    fn bridge_released<'a>(&'a self, name: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.leases.release(name))
    }

    fn position(&self) -> u64 {
        self.sequencer.seen.load(Ordering::Acquire)
    }

    fn store_subscriptions(
        &self,
        client_id: &Arc<str>,
        subs: Vec<SubscriptionRecord>,
        drained: Option<u64>,
        local: Commit,
    ) -> Commit {
        Commit::both(local, self.anchors.put(client_id, subs, drained))
    }

    fn session_ended(&self, client_id: &Arc<str>) {
        self.anchors.delete(client_id);
    }

    fn members(&self) -> Vec<String> {
        self.wills
            .members
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn drain(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while (self.out.capacity() < forward::CAPACITY
                || self.busy.load(Ordering::Acquire)
                || self.wills.removing.load(Ordering::Acquire) > 0)
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
        })
    }

    fn take_session<'a>(
        &'a self,
        client_id: &'a str,
        handle: &'a Arc<SessionHandle>,
        state: &'a mut SessionState,
    ) -> BoxFuture<'a, Option<Commit>> {
        Box::pin(self.sessions.take_session(client_id, handle, state))
    }
}

/// How long `tern cluster import` asks again for a retained message JetStream refused.
const IMPORT_RETRY: Duration = Duration::from_secs(10);

/// Publishes every retained message of this node's store to the cluster's retained stream
/// (`tern cluster import`), waiting for each to be stored.
async fn import_retained(
    broker: &Arc<Broker>,
    js: &jetstream::Context,
    names: &Names,
    node: &str,
) -> Result<usize, ClusterError> {
    let mut all = Vec::new();
    broker.retained_for("#", &mut all);
    for msg in &all {
        // A stream made a moment ago may not be known yet to the server this node talks to
        // ("no stream found for given subject", seen in CI under load): asked again for a
        // while before the import gives up.
        let deadline = tokio::time::Instant::now() + IMPORT_RETRY;
        loop {
            let stored = async {
                js.publish_with_headers(
                    names.retained.topic(msg.topic.as_str()),
                    wire::headers(node),
                    wire::encode(msg),
                )
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
            }
            .await;
            match stored {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(ClusterError::JetStream(format!("importing retained: {e}")))
                }
                Err(e) => {
                    tracing::debug!(error = %e, "importing retained: asking again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    Ok(all.len())
}

/// Connects to the seed servers; async-nats reconnects by itself, forever, to any server of
/// the cluster it has learnt of.
/// `echo`: whether this connection receives what it publishes itself (only the groups'
/// connection does; see `groups.rs`).
async fn connect(config: &ClusterConfig, echo: bool) -> Result<async_nats::Client, ClusterError> {
    let error = |message: String| ClusterError::Connect {
        urls: config.nats.join(","),
        message,
    };
    let mut options = if config.credentials.as_os_str().is_empty() {
        async_nats::ConnectOptions::new()
    } else {
        async_nats::ConnectOptions::with_credentials_file(&config.credentials)
            .await
            .map_err(|e| error(format!("credentials {}: {e}", config.credentials.display())))?
    };
    let node = config.node.clone();
    if !echo {
        // Our own core NATS publishes need not come back to us.
        options = options.no_echo();
    }
    options = options
        .name(format!("tern-{}", config.node))
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let node = node.clone();
            async move {
                match event {
                    async_nats::Event::Connected => tracing::info!(%node, "NATS connected"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!(%node, "NATS disconnected; reconnecting")
                    }
                    other => tracing::warn!(%node, event = %other, "NATS"),
                }
            }
        });
    let urls: Vec<async_nats::ServerAddr> = config
        .nats
        .iter()
        .map(|u| u.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| error(format!("bad URL: {e}")))?;
    options
        .connect(urls)
        .await
        .map_err(|e| error(e.to_string()))
}

/// Unique per run of a node: with the node name and a message id it makes the JetStream
/// deduplication id, so a restarted node's ids (which start again at 1) are never taken
/// for duplicates of its previous run's.
fn boot_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Puts this node's heartbeat every third of the bucket's TTL. The node counts as cut off
/// from JetStream's quorum (`available` false: persistent CONNECTs refused with 0x88, the
/// gauge 0) once no heartbeat has been stored for `quorum_timeout`, the same patience a
/// publish has. One failed put is no quorum loss: when the server holding the nodes bucket's
/// Raft leader dies, puts fail for the 4 to 9 s of the election while two servers of three
/// keep the quorum, and refusing clients then was refusing them for nothing.
/// One put waits at most a third of the TTL (or `quorum_timeout` if shorter): a put whose
/// answer is lost must not keep the next one back until the heartbeat expires and the other
/// nodes take this node, live, for dead.
async fn heartbeat(
    broker: Arc<Broker>,
    nodes: jetstream::kv::Store,
    node: String,
    available: Arc<AtomicBool>,
    quorum_timeout: Duration,
    ttl: Duration,
) {
    let every = ttl / 3;
    let wait = quorum_timeout.min(every);
    let mut last_stored = tokio::time::Instant::now();
    loop {
        let put =
            tokio::time::timeout(wait, nodes.put(&node, bytes::Bytes::from_static(b"up"))).await;
        let stored = match put {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::debug!(%node, error = %e, "heartbeat not stored");
                false
            }
            Err(_) => false,
        };
        if stored {
            last_stored = tokio::time::Instant::now();
        }
        let ok = stored || last_stored.elapsed() < quorum_timeout;
        broker.metrics.cluster.available.set(i64::from(ok));
        if available.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                tracing::info!(%node, "cluster quorum reachable again");
            } else {
                tracing::warn!(
                    %node,
                    "cluster quorum unreachable: durable publishes are refused"
                );
            }
        }
        tokio::time::sleep(if stored {
            every
        } else {
            Duration::from_millis(500)
        })
        .await;
    }
}

/// The key of the start-up write to each bucket (see `join`): not a client id's key.
const PROBE_KEY: &str = "tern-probe";

/// The lowest anchor (`anchors.rs`) of the persistent sessions restored here: every QoS 1/2
/// message any of them still needs was published after it. None: no persistent session here,
/// nothing owed from the past. A session without an anchor naming this node counts as 0.
async fn restored_low(broker: &Arc<Broker>, anchors: &anchors::Anchors, node: &str) -> Option<u64> {
    let mut low: Option<u64> = None;
    for h in broker.registry.handles() {
        if !h.persistent.load(Ordering::Relaxed) {
            continue;
        }
        let l = match anchors.get(&h.client_id).await {
            Some(a) if a.node == node => a.low,
            _ => 0,
        };
        low = Some(low.map_or(l, |x| x.min(l)));
    }
    low
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(node: &str) -> ClusterConfig {
        crate::config::Config::from_toml(&format!(
            "[cluster]\nnode = \"{node}\"\nnats = [\"nats://127.0.0.1:4222\"]\n"
        ))
        .unwrap()
        .cluster
        .unwrap()
    }

    /// A new directory becomes the node's; one with single-node state is refused unless
    /// imported; another node's is refused always.
    #[test]
    fn a_data_directory_belongs_to_one_node() {
        let dir = std::env::temp_dir().join(format!("tern-marker-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let held = || Some("1 sessions, 0 retained messages".to_string());
        let t1 = config("t1");
        let e = check_marker(&dir, &t1, held(), JoinMode::Serve).unwrap_err();
        assert!(e.to_string().contains("tern cluster import"), "{e}");
        assert!(!check_marker(&dir, &t1, held(), JoinMode::Import).unwrap());
        mark(&dir, &t1).unwrap();
        assert!(check_marker(&dir, &t1, held(), JoinMode::Serve).unwrap());
        let e = check_marker(&dir, &config("t2"), None, JoinMode::Serve).unwrap_err();
        assert!(matches!(e, ClusterError::ForeignStore { .. }), "{e}");
        std::fs::remove_file(dir.join(MARKER)).unwrap();
        assert!(
            check_marker(&dir, &t1, None, JoinMode::Serve).unwrap(),
            "empty: marked"
        );
        assert!(dir.join(MARKER).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
