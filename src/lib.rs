//! Tern, an MQTT 3.1 / 3.1.1 / 5.0 broker.
//!
//! Data flows one way: socket → [`listener`] → [`connection`] (a sans-IO core driven by a
//! tokio task) → [`protocol`] decode → [`session`] state → [`broker`] (match, retain,
//! fan-out, the durable routing step) → each target's [`outbox`] → its connection → encode →
//! socket. What must survive a restart goes through [`storage`], whose commits run the
//! effects that follow them. Tests and the binary start the same thing through [`start`].
//!
//! Layers, bottom first (a module uses only its own layer and those below; `make lint` checks
//! it with `tools/layers.py`): [`clock`]; [`protocol`]; [`config`]; [`message`]; [`auth`],
//! [`tls`], [`logging`]; [`storage`]; [`outbox`]; [`session`]; [`metrics`]; [`broker`];
//! [`status`]; [`connection`]; [`http`]; [`websocket`]; [`listener`]; [`reload`]; then this
//! file's startup. The map with one line per file is `docs/architecture.md`.

// Data from clients and files must never reach a panic: outside tests, no unwrap/expect.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod auth;
pub mod bridge;
pub mod broker;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod ctl;
pub mod http;
pub mod listener;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod migrate;
pub mod outbox;
pub mod protocol;
pub mod proxy;
pub mod reload;
pub mod session;
pub mod status;
pub mod storage;
pub mod tls;
pub mod websocket;

pub use config::Config;
pub use reload::{ReloadError, Reloaded};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use listener::Opened;

/// A running broker: its bound addresses and the handle to stop it.
pub struct Running {
    /// In name order.
    listeners: Vec<Opened>,
    metrics_addr: Option<SocketAddr>,
    broker: Arc<broker::Broker>,
    bridges: Arc<bridge::Bridges>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The HTTP server's task and its stop signal; it outlives the MQTT drain (see `shutdown`).
    http: Option<(JoinHandle<()>, oneshot::Sender<()>)>,
    connections: Arc<AtomicUsize>,
    ready: Arc<AtomicBool>,
    /// The configuration in force (the startup one, with what reloads applied).
    config: Mutex<Config>,
    /// The admin API's tokens, re-read on reload.
    admin_tokens: Option<Arc<admin::Tokens>>,
    /// The metrics port's certificate, re-read on reload.
    metrics_tls: Option<Arc<tls::TlsReloader>>,
    log: Option<logging::LogHandle>,
}

impl Running {
    /// The real address of listener `name` (also when configured with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.name() == name)
            .map(|l| l.addr)
    }

    /// The listener of `kind` named after it (`[listeners.tcp]` ...), else the first of that
    /// kind by name: the single listener of each kind earlier releases had.
    fn addr_of(&self, kind: config::listeners::Kind) -> Option<SocketAddr> {
        self.listener_addr(kind.label()).or_else(|| {
            self.listeners
                .iter()
                .find(|l| l.kind == kind)
                .map(|l| l.addr)
        })
    }

    /// The MQTT TCP listener's real address (also when configured with port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.addr_of(config::listeners::Kind::Tcp)
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The MQTT-over-WebSocket listener's real address.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.addr_of(config::listeners::Kind::Ws)
    }

    /// The MQTT-over-WebSocket-over-TLS listener's real address.
    pub fn wss_addr(&self) -> Option<SocketAddr> {
        self.addr_of(config::listeners::Kind::Wss)
    }

    /// The MQTT-over-TLS listener's real address.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.addr_of(config::listeners::Kind::Tls)
    }

    /// Applies `new` (SIGHUP): what can change without a restart changes, existing
    /// connections stay up, and every change is logged. Files named by the configuration
    /// (password file, ACL, TLS certificates) are read again even when their names did not
    /// change. On error nothing changed and the error says which key or file is wrong.
    pub fn reload(&self, new: Config) -> Result<Reloaded, ReloadError> {
        let mut running = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        let target = reload::Target {
            broker: &self.broker,
            bridges: Some(&self.bridges),
            listeners: &self.listeners,
            metrics_tls: self.metrics_tls.as_ref(),
            admin: self.admin_tokens.as_ref(),
            log: self.log.as_ref(),
        };
        let (next, report) = reload::apply(&target, &running, &new)?;
        *running = next;
        Ok(report)
    }

    /// Reads the configuration file at `path` (None: the defaults) and applies it as
    /// [`Running::reload`] does. A file that cannot be read or parsed is a failed reload too
    /// (`tern_config_reloads_total{result="failure"}`): a typo is the likeliest reason a
    /// SIGHUP changes nothing, and the alert on failed reloads must see it.
    pub fn reload_from(&self, path: Option<&std::path::Path>) -> Result<Reloaded, ReloadError> {
        match Config::load(path) {
            Ok(new) => self.reload(new),
            Err(e) => {
                self.broker.metrics.reloaded(metrics::ReloadResult::Failure);
                Err(e.into())
            }
        }
    }

    /// Lets reloads change the level filter of the process's log subscriber.
    pub fn set_log_handle(&mut self, log: logging::LogHandle) {
        self.log = Some(log);
    }

    pub fn broker(&self) -> &Arc<broker::Broker> {
        &self.broker
    }

    /// The line printed on stdout when ready; out-of-process tests look for it. Every
    /// listener as `NAME=ADDR`; `tcp`, `metrics` and a node's `cluster` come first, as they
    /// always have (`off` when there is none).
    pub fn ready_line(&self) -> String {
        let show = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
        let mut line = format!(
            "tern: ready tcp={} metrics={}",
            show(self.listener_addr("tcp")),
            show(self.metrics_addr)
        );
        if let Some(peers) = self.broker.peers() {
            line.push_str(&format!(" cluster={}", peers.node()));
        }
        for l in self.listeners.iter().filter(|l| l.name() != "tcp") {
            line.push_str(&format!(" {}={}", l.name(), l.addr));
        }
        line
    }

    /// Stops accepting, tells every client (v5: DISCONNECT 0x8B), publishes wills, and waits
    /// up to `grace` for connections to finish. The HTTP server answers (`/ready` 503) until
    /// then, and stops last: it stops accepting and finishes its requests within a second.
    pub async fn shutdown(mut self, grace: Duration) {
        self.ready.store(false, Ordering::Release);
        // The listeners stop on the watch; connections learn it through the registry (the
        // channel they already wait on for a takeover, see `Registry::close`).
        let _ = self.shutdown.send(true);
        self.broker.registry.close();
        let deadline = tokio::time::Instant::now() + grace;
        while self.connections.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Each bridge's link says DISCONNECT; what it had in flight is back in its queue.
        self.bridges.stop_all(Duration::from_secs(2)).await;
        if let Some(peers) = self.broker.peers() {
            peers.drain().await;
        }
        if let Some((task, stop)) = self.http.take() {
            let _ = stop.send(());
            // `http::serve` bounds its own drain.
            let _ = task.await;
        }
        for t in std::mem::take(&mut self.tasks) {
            t.abort();
        }
        self.broker.groups.close_all();
        self.broker.store.close();
    }
}

impl Drop for Running {
    /// Dropped without `shutdown` (a test, a failed start): serving stops too. The listeners
    /// see the watch's sender go; the connections are told through the registry.
    fn drop(&mut self) {
        self.broker.registry.close();
        self.bridges.stop_now();
    }
}

/// Errors that stop the broker from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(String),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    Bridge(#[from] crate::bridge::BridgeError),
    #[error(transparent)]
    Admin(#[from] crate::admin::TokenError),
}

/// Binds the listeners and starts serving. Returns once every listener is open.
pub async fn start(config: Config) -> Result<Running, StartError> {
    config.validate()?;
    listener::raise_fd_limit(config.limits.max_connections);
    let metrics = metrics::Metrics::new().map_err(|e| StartError::Metrics(e.to_string()))?;
    // Recover before any listener opens: a returning client must find its session.
    let (store, recovered) = storage::open(&config.storage)?;
    store.set_observer(Box::new(metrics.storage.clone()));
    let auth = auth::Authorizer::load_counted(
        &config.mqtt.response_prefix,
        &config.auth,
        metrics.auth_http.clone(),
    )?
    .reserving_responses(config.mqtt.reserve_response_topics);
    // Before any listener opens: a token signed with the JWKS's keys works from the first
    // CONNECT.
    auth.fetch_keys().await;
    let broker = Arc::new(broker::Broker::new(config, metrics, store, auth));
    let restored = broker::recovery::restore(&broker, recovered);
    tracing::info!(
        store = broker.store.name(),
        sessions = restored.sessions,
        expired_sessions = restored.expired_sessions,
        subscriptions = restored.subscriptions,
        queued = restored.queued,
        inflight = restored.inflight,
        retained = restored.retained,
        "state recovered"
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let connections = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let mut fleet = None;
    if let Some(cluster) = broker.config.cluster.clone() {
        // Joined before any listener opens: the first client already sees the cluster's
        // retained messages and reaches the other nodes.
        let joined =
            cluster::Node::join(&broker, &cluster, held(&restored), cluster::JoinMode::Serve)
                .await?;
        tasks.extend(joined.tasks);
        // Every node answers the admin API's requests from the others, API on here or not.
        tasks.push(
            joined
                .node
                .serve_admin(admin::cluster_handler(broker.clone())),
        );
        fleet = Some(joined.node);
    }
    // Declared queues after recovery, which restored the ones stored, and after joining a
    // cluster, whose consumers feed them there: they collect before any listener opens.
    broker.declare_queues(&broker.config.queues);

    let mut metrics_addr = None;
    let mut http = None;
    let mut admin_tokens = None;
    let mut metrics_tls = None;
    if let Some(addr) = broker.config.metrics.bind {
        let admin = match &broker.config.admin.token_file {
            Some(path) => {
                let tokens = Arc::new(admin::Tokens::load(path)?);
                admin_tokens = Some(tokens.clone());
                Some(admin::Admin::new(broker.clone(), tokens, fleet.clone()))
            }
            None => None,
        };
        let tls = match broker.config.metrics.tls() {
            Some(cfg) => {
                let reloader = Arc::new(tls::TlsReloader::new(
                    cfg,
                    broker.metrics.metrics_certificate_expiry(),
                )?);
                tasks.push(tokio::spawn(reloader.clone().watch()));
                metrics_tls = Some(reloader.clone());
                Some(reloader)
            }
            None => None,
        };
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "metrics",
                addr,
                source,
            })?;
        metrics_addr = l.local_addr().ok();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(http::serve(
            l,
            broker.clone(),
            ready.clone(),
            admin,
            tls,
            async move {
                // Sent by `Running::shutdown`; dropped with `Running` (then serving stops too).
                let _ = stopped.await;
            },
        ));
        http = Some((task, stop));
    }
    let mut listeners = Vec::new();
    for (name, l) in broker.config.listeners.iter() {
        listeners
            .push(open_listener(&broker, name, l, &connections, &shutdown_rx, &mut tasks).await?);
    }
    tasks.push(tokio::spawn(broker.clone().run_expiry()));
    tasks.push(tokio::spawn(broker::sys::run(broker.clone())));
    // Bridges last: what they bring in finds the listeners' clients' sessions in place.
    let bridges = Arc::new(bridge::Bridges::new(broker.clone()));
    let prepared = bridge::prepare(
        &broker.config.bridges,
        broker.config.limits.max_packet_size as usize,
    )?;
    bridges.apply(prepared).await;
    reload::publish_bounds(&broker.metrics, &broker.config);
    ready.store(true, Ordering::Release);
    let config = Mutex::new(broker.config.clone());
    Ok(Running {
        config,
        listeners,
        metrics_addr,
        broker,
        bridges,
        shutdown: shutdown_tx,
        tasks,
        http,
        connections,
        ready,
        log: None,
        admin_tokens,
        metrics_tls,
    })
}

/// What a recovered store holds, said for an error message; `None` when empty.
fn held(r: &broker::recovery::Restored) -> Option<String> {
    (r.sessions + r.retained > 0)
        .then(|| format!("{} sessions, {} retained messages", r.sessions, r.retained))
}

/// `tern cluster import`: takes a single-node store into the cluster it is configured to
/// join (its retained messages into the cluster's retained stream; its sessions stay in the
/// store, served by this node and anchored for the others) and marks it as this node's.
/// Returns what the store held.
pub async fn import(config: Config) -> Result<String, StartError> {
    config.validate()?;
    let Some(cluster) = config.cluster.clone() else {
        return Err(StartError::Config(config::ConfigError::Invalid {
            key: "cluster",
            message: "`tern cluster import` needs the [cluster] section of the node to join"
                .to_string(),
        }));
    };
    let metrics = metrics::Metrics::new().map_err(|e| StartError::Metrics(e.to_string()))?;
    let (store, recovered) = storage::open(&config.storage)?;
    let auth = auth::Authorizer::load(&config.mqtt.response_prefix, &config.auth)?
        .reserving_responses(config.mqtt.reserve_response_topics);
    let broker = Arc::new(broker::Broker::new(config, metrics, store, auth));
    let restored = broker::recovery::restore(&broker, recovered);
    let what = held(&restored).unwrap_or_else(|| "nothing".to_string());
    let joined = cluster::Node::join(
        &broker,
        &cluster,
        held(&restored),
        cluster::JoinMode::Import,
    )
    .await?;
    if let Some(peers) = broker.peers() {
        peers.drain().await;
    }
    for t in joined.tasks {
        t.abort();
    }
    broker.store.close();
    Ok(what)
}

/// Binds listener `name` and starts accepting on it (its TLS files read, its reloader
/// watching them).
async fn open_listener(
    broker: &Arc<broker::Broker>,
    name: &str,
    l: &config::ListenerConfig,
    connections: &Arc<AtomicUsize>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<Opened, StartError> {
    use config::listeners::Kind;
    let kind = l.kind_for(name).ok_or_else(|| {
        StartError::Config(config::ConfigError::Value {
            key: format!("listeners.{name}.kind"),
            message: "required".to_string(),
        })
    })?;
    let cfg = &broker.config;
    let door = listener::Door::new(
        name,
        l,
        cfg,
        connections.clone(),
        broker.metrics.listener_connections(name),
    );
    let tls = match l.tls() {
        Some(t) if kind.is_tls() => {
            let reloader = Arc::new(tls::TlsReloader::new(
                t,
                broker.metrics.tls_certificate_expiry(name),
            )?);
            tasks.push(tokio::spawn(reloader.clone().watch()));
            Some(reloader)
        }
        _ => None,
    };
    // A WebSocket message carries MQTT packets (usually one); the bound only keeps a
    // client from making the broker buffer more than a packet's worth plus slack.
    let ws_options = || {
        let ws = l.ws();
        Arc::new(websocket::WsOptions {
            path: ws.path,
            allowed_origins: ws.allowed_origins,
            max_message_size: door.entry().limits.max_packet_size as usize + 64 * 1024,
        })
    };
    let transport = match (kind, &tls) {
        (Kind::Tcp, _) => listener::Transport::Tcp,
        (Kind::Ws, _) => listener::Transport::Ws(ws_options()),
        (Kind::Tls, Some(t)) => listener::Transport::Tls(t.clone()),
        (Kind::Wss, Some(t)) => listener::Transport::Wss(t.clone(), ws_options()),
        (_, None) => {
            return Err(StartError::Config(config::ConfigError::Value {
                key: format!("listeners.{name}.cert"),
                message: "required on a TLS listener".to_string(),
            }))
        }
    };
    let addr = l.bind;
    let what: &'static str = door.name();
    let bound = listener::bind(addr).map_err(|source| StartError::Bind { what, addr, source })?;
    let addr = bound.local_addr().unwrap_or(addr);
    tasks.push(tokio::spawn(listener::run(
        bound,
        transport,
        door.clone(),
        l.proxy_protocol,
        broker.clone(),
        shutdown.clone(),
    )));
    Ok(Opened {
        kind,
        addr,
        door,
        tls,
    })
}
