//! Bridges: Tern connecting out to another MQTT 3.1.1 or 5.0 broker (Mosquitto, another
//! Tern), forwarding local messages to it and taking its messages in.
//!
//! This module is the *link*, Tern acting as an MQTT client, kept apart from the broker side
//! (the durable outgoing queue, ACL, configuration, metrics) so that the client protocol can
//! be tested on its own and the broker side sees only a small API:
//!
//! - [`client`]: the sans-IO client core (bytes and `now` in; bytes, events and the next timer
//!   out), one per connection;
//! - [`link`]: the tokio task that drives a core over TCP or TLS, reconnects with backoff, and
//!   talks to its owner through a bounded outbox and an event channel.
//!
//! It uses Tern's own codec (`crate::protocol`, the client-role half in `protocol/client.rs`),
//! never a client library.
//!
//! On top of the link:
//! - [`rules`]: topic mapping by the `out` and `in` rules, and the echo filter (no I/O);
//! - `running.rs`: one running bridge, between its durable outgoing queue and its link;
//! - this file: [`Bridges`], starting, changing and stopping bridges as the configuration
//!   says (docs/bridges.md).

pub mod client;
pub mod link;
pub mod rules;
mod running;

use crate::broker::shared::Kind;
use crate::broker::Broker;
use crate::config::BridgeConfig;
use crate::outbox::Outbox;
use crate::protocol::ProtocolVersion;
use crate::session::registry::SessionHandle;
use bytes::Bytes;
use client::{LinkOptions, Subscription};
use link::{Backoff, LinkConfig, TlsClient};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why a bridge cannot start (at start-up, the broker does not start; on reload, the reload
/// is refused and the running bridges stay).
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("bridge {name:?}: cannot read secret_file {path}: {source}")]
    Secret {
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error("bridge {name:?}: tls: {source}")]
    Tls {
        name: String,
        source: crate::tls::TlsError,
    },
    #[error("bridge {name:?}: {message}")]
    Invalid { name: String, message: String },
}

/// A bridge's configuration with its files read: what starting it cannot fail on.
pub struct Prepared {
    config: BridgeConfig,
    link: LinkConfig,
}

/// Reads what `configs` name (secrets, TLS files) and checks what the wire cannot carry.
pub fn prepare(
    configs: &[BridgeConfig],
    max_packet_size: usize,
) -> Result<Vec<Prepared>, BridgeError> {
    configs
        .iter()
        .map(|c| prepare_one(c, max_packet_size))
        .collect()
}

fn prepare_one(c: &BridgeConfig, max_packet_size: usize) -> Result<Prepared, BridgeError> {
    let invalid = |message: String| BridgeError::Invalid {
        name: c.name.clone(),
        message,
    };
    let (host, port) = c
        .address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| invalid(format!("{:?} is not host:port", c.address)))?;
    // `[::1]:1883`: the brackets belong to the address, not the host.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let version = match c.protocol.as_str() {
        "3.1.1" => ProtocolVersion::V3_1_1,
        _ => ProtocolVersion::V5,
    };
    let v5 = version == ProtocolVersion::V5;
    let mut options = LinkOptions::new(version, c.client_id());
    options.username = (!c.username.is_empty()).then(|| c.username.clone());
    if !c.secret_file.as_os_str().is_empty() {
        let secret = std::fs::read(&c.secret_file).map_err(|source| BridgeError::Secret {
            name: c.name.clone(),
            path: c.secret_file.display().to_string(),
            source,
        })?;
        let mut secret = secret.as_slice();
        for end in [b"\n".as_slice(), b"\r".as_slice()] {
            secret = secret.strip_suffix(end).unwrap_or(secret);
        }
        options.password = Some(Bytes::copy_from_slice(secret));
    }
    options.keep_alive = c.keep_alive;
    // A session at the remote that outlives the link: what the `in` rules subscribe to is
    // kept there while the link is down (for a day, in v5).
    options.clean_start = false;
    options.session_expiry = 86_400;
    options.subscriptions = c
        .inbound
        .iter()
        .map(|r| Subscription {
            filter: r.filter.clone(),
            qos: crate::protocol::QoS::from_u8(r.qos).unwrap_or(crate::protocol::QoS::AtLeastOnce),
            no_local: v5,
        })
        .collect();
    options.window = c.window;
    options.max_packet_size = max_packet_size;
    options.validate().map_err(|e| invalid(e.to_string()))?;
    let tls = match &c.tls {
        None => None,
        Some(t) => {
            let identity = match (&t.cert, &t.key) {
                (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
                (None, None) => None,
                _ => return Err(invalid("tls: cert and key go together".into())),
            };
            let config =
                crate::tls::client_config(&t.ca, identity).map_err(|source| BridgeError::Tls {
                    name: c.name.clone(),
                    source,
                })?;
            Some(TlsClient {
                config,
                server_name: t.server_name.clone().unwrap_or_else(|| host.clone()),
            })
        }
    };
    Ok(Prepared {
        config: c.clone(),
        link: LinkConfig {
            name: c.name.clone(),
            host,
            port,
            tls,
            options,
            backoff: Backoff::default(),
            events_capacity: 1024,
        },
    })
}

/// A started bridge: its stop signal and task.
struct Started {
    config: BridgeConfig,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The bridges of a running broker, started, changed and stopped as the configuration says.
pub struct Bridges {
    broker: Arc<Broker>,
    running: Mutex<HashMap<String, Started>>,
    /// One reconfiguration at a time, in the order they were asked for.
    changing: tokio::sync::Mutex<()>,
}

impl Bridges {
    pub fn new(broker: Arc<Broker>) -> Bridges {
        Bridges {
            broker,
            running: Mutex::new(HashMap::new()),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    /// [`Bridges::apply`] in the background (a reload does not wait for links to say
    /// DISCONNECT); reconfigurations are applied one after the other.
    pub fn reconfigure(self: &Arc<Self>, prepared: Vec<Prepared>) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move { this.apply(prepared).await })
    }

    /// Makes the running bridges those of `prepared`: new ones start, changed ones restart
    /// (keeping their queue), removed ones stop; a removed bridge's queue stops collecting and
    /// keeps its messages (until purged, or until the bridge is configured again).
    pub async fn apply(&self, prepared: Vec<Prepared>) {
        let _one = self.changing.lock().await;
        let mut stopping = Vec::new();
        {
            let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            let keep: Vec<&str> = prepared.iter().map(|p| p.config.name.as_str()).collect();
            let gone: Vec<String> = running
                .keys()
                .filter(|n| !keep.contains(&n.as_str()))
                .cloned()
                .collect();
            for name in gone {
                stopping.extend(running.remove(&name));
            }
            for p in &prepared {
                if running
                    .get(&p.config.name)
                    .is_some_and(|s| s.config != p.config)
                {
                    stopping.extend(running.remove(&p.config.name));
                }
            }
        }
        for s in stopping {
            let _ = s.stop.send(true);
            let _ = s.task.await;
        }
        let names: Vec<&str> = prepared.iter().map(|p| p.config.name.as_str()).collect();
        self.broker.undeclare_others(Kind::Bridge, &names);
        for p in prepared {
            let started = {
                let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
                running.contains_key(&p.config.name)
            };
            if started {
                continue;
            }
            match self.start(p) {
                Ok((name, s)) => {
                    self.running
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(name, s);
                }
                Err(e) => tracing::error!(error = %e, "bridge not started"),
            }
        }
    }

    fn start(&self, p: Prepared) -> Result<(String, Started), link::LinkError> {
        let c = &p.config;
        let filters: Vec<&str> = c.out.iter().map(|r| r.filter.as_str()).collect();
        let group = self.broker.declare_group(Kind::Bridge, &c.name, &filters);
        group
            .queue
            .outbox
            .set_limits(c.max_queued_messages, c.max_queued_bytes);
        let member = Arc::new(SessionHandle::new(
            self.broker.registry.allocate_id(),
            Arc::from(format!("\0$bridge/{}#link", c.name)),
            Outbox::new(1, 1),
            false,
        ));
        let (stop, stop_rx) = watch::channel(false);
        let spec = Arc::new(running::Spec {
            name: c.name.clone(),
            broker: self.broker.clone(),
            group,
            member,
            out_rules: c.out.clone(),
            in_rules: c.inbound.clone(),
            v5: c.protocol != "3.1.1",
            window: c.window,
            metrics: self.broker.metrics.bridge_metrics(&c.name),
            acl_user: format!("bridge:{}", c.name),
        });
        // Checked now, so a bad one is an error here rather than in the task.
        link::check(&p.link)?;
        let task = tokio::spawn(supervise(spec, p.link, stop_rx));
        tracing::info!(bridge = %c.name, address = %c.address, protocol = %c.protocol, "bridge started");
        Ok((
            c.name.clone(),
            Started {
                config: p.config,
                stop,
                task,
            },
        ))
    }

    /// Tells every bridge to stop without waiting (a `Running` dropped without shutdown).
    pub fn stop_now(&self) {
        for s in self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            let _ = s.stop.send(true);
        }
    }

    /// Stops every bridge (broker shutdown): each link says DISCONNECT, what was in flight
    /// goes back to its queue. Bounded: a link that does not finish within `grace` is left.
    pub async fn stop_all(&self, grace: Duration) {
        let all: Vec<Started> = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in &all {
            let _ = s.stop.send(true);
        }
        for s in all {
            let _ = tokio::time::timeout(grace, s.task).await;
        }
    }
}

/// How often a cluster node renews a bridge's lease, or tries to take it: well within the
/// lease's 10 s life (`cluster/leases.rs`).
const LEASE_RENEW: Duration = Duration::from_secs(3);

/// Runs bridge `spec` until `stop`: at once on a single node; in a cluster only while this
/// node holds the bridge's lease, so one node at a time runs it, and another takes over
/// (with the queue, which is the cluster's) when this one dies or stops.
async fn supervise(
    spec: Arc<running::Spec>,
    link_cfg: LinkConfig,
    mut stop: watch::Receiver<bool>,
) {
    let peers = spec.broker.peers().cloned();
    loop {
        if let Some(p) = &peers {
            loop {
                let stopped = *stop.borrow();
                if stopped {
                    return;
                }
                if p.bridge_lease(&spec.name).await {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(LEASE_RENEW) => {}
                    _ = link::stop_signal(&mut stop) => return,
                }
            }
            tracing::info!(bridge = %spec.name, node = %p.node(), "bridge lease held: the bridge runs on this node");
        }
        let (link_stop, link_stop_rx) = watch::channel(false);
        let link = match link::spawn(link_cfg.clone(), link_stop_rx.clone()) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(bridge = %spec.name, error = %e, "bridge link not started");
                return;
            }
        };
        let forwarder = running::Forwarder {
            spec: spec.clone(),
            link: link.handle,
        };
        let mut run = tokio::spawn(forwarder.run(link.events, link_stop_rx));
        let mut ran_out = false;
        let lost = loop {
            tokio::select! {
                _ = link::stop_signal(&mut stop) => break false,
                _ = &mut run => {
                    ran_out = true;
                    break false;
                }
                _ = tokio::time::sleep(LEASE_RENEW), if peers.is_some() => {
                    if let Some(p) = &peers {
                        // A renewal that does not answer in time counts as lost: the lease
                        // may expire meanwhile and another node take the bridge.
                        let renewed = tokio::time::timeout(LEASE_RENEW, p.bridge_lease(&spec.name))
                            .await
                            .unwrap_or(false);
                        if !renewed {
                            break true;
                        }
                    }
                }
            }
        };
        let _ = link_stop.send(true);
        if !ran_out {
            let _ = run.await;
        }
        let _ = link.task.await;
        if lost {
            tracing::warn!(bridge = %spec.name, "bridge lease lost: the bridge stops on this node");
            continue;
        }
        if let Some(p) = &peers {
            p.bridge_released(&spec.name).await;
        }
        return;
    }
}
