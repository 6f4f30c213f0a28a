//! The bridge link's driver: one tokio task that connects to the remote broker over TCP or
//! TLS, runs a [`ClientCore`] per connection, and reconnects with backoff until shut down.
//!
//! The owner (the broker's bridge) talks to it through a [`LinkHandle`] and an event channel,
//! shaped so that memory stays bounded and no broker thread ever waits:
//!
//! - **Publishes** go into a shared outbox with `try_publish`, a short lock and never a wait.
//!   The outbox takes only as many messages as the core's window has room for; the task moves
//!   them into the core. When the window is full, `try_publish` says `Full` and the owner waits
//!   for `room_changed` (or polls `room`). So at most one window is queued and one in flight.
//! - **Events** (connected, acked, messages, ...) come through a bounded `mpsc` channel. When the
//!   owner is slow the task waits to send and stops reading the socket, so the remote broker is
//!   held back by TCP rather than by memory here. The owner must keep reading events (its acks
//!   arrive there, and they are what frees room in the window).
//! - **Generations.** Every connection gets a new generation number, in `Connected` and
//!   `Disconnected`. `try_publish` returns the generation a message went into; after
//!   `Disconnected { generation }`, every message of that generation not yet `Acked` is the
//!   owner's again, to re-send with `dup` set. The outbox is emptied, under its lock, when a
//!   connection ends, and refuses messages until the next CONNACK, so a message never slips
//!   from one connection into the next behind the owner's back. Incoming messages carry their
//!   generation too: packet ids mean nothing on another connection, so an acknowledgement
//!   (`ack_incoming`) for an earlier generation is dropped, and the remote re-sends the message.
//!
//! Backoff between attempts is "full jitter" (a uniform delay between zero and a cap that
//! doubles from `initial` to `max`), so that many bridges cut off together do not come back
//! together; the cap starts over after a connection that got its CONNACK. One log line per
//! connect, disconnect and failed attempt, never per message.

use super::client::{ClientCore, CloseReason, Event, Incoming, LinkOptions, OptionsError};
use crate::protocol::{MqttStr, PublishProperties, QoS};
use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

/// TLS towards the remote broker.
#[derive(Clone)]
pub struct TlsClient {
    /// From [`crate::tls::client_config`].
    pub config: Arc<rustls::ClientConfig>,
    /// The name the remote's certificate must carry (a DNS name or an IP address); usually
    /// the host connected to.
    pub server_name: String,
}

/// Delay between connection attempts: full jitter under a cap doubling from `initial` to
/// `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// Everything a link needs.
#[derive(Clone)]
pub struct LinkConfig {
    /// Names the link in its log lines.
    pub name: String,
    pub host: String,
    pub port: u16,
    pub tls: Option<TlsClient>,
    pub options: LinkOptions,
    pub backoff: Backoff,
    /// Capacity of the event channel.
    pub events_capacity: usize,
}

/// Why a link cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("bridge link options: {0}")]
    Options(#[from] OptionsError),
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

/// One message for the remote broker. `token` is the owner's, returned in
/// [`LinkEvent::Acked`].
#[derive(Debug, Clone)]
pub struct OutMessage {
    pub token: u64,
    pub topic: MqttStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// v5 only; 3.1.1 sends none.
    pub properties: PublishProperties,
    /// A re-send of a message an earlier connection may have delivered.
    pub dup: bool,
}

/// Why [`LinkHandle::try_publish`] did not take a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("window full")]
    Full,
    #[error("not connected")]
    NotConnected,
    #[error("link stopped")]
    Stopped,
}

/// What the link tells its owner, in order.
#[derive(Debug)]
pub enum LinkEvent {
    Connected {
        generation: u64,
        session_present: bool,
    },
    /// An attempt that did not reach a successful CONNACK (refused, unreachable, timed out).
    ConnectFailed {
        reason: CloseReason,
        retry_in: Duration,
    },
    /// The connection of `generation` ended: its messages not `Acked` are the owner's again.
    Disconnected {
        generation: u64,
        reason: CloseReason,
    },
    /// See [`Event::Acked`]; also a message that can never go out on this link (too large
    /// for the remote, invalid topic), with the reason code saying why.
    Acked {
        token: u64,
        reason: u8,
    },
    /// Acknowledge with [`LinkHandle::ack_incoming`]`(generation, message.packet_id)` once
    /// stored (QoS 1 and 2).
    Message {
        generation: u64,
        message: Incoming,
    },
    SubscribeRefused {
        filter: String,
        reason: u8,
    },
}

/// The outbox shared by the owner and the task, under one lock.
#[derive(Default)]
struct Outbox {
    generation: u64,
    connected: bool,
    stopped: bool,
    /// How many messages `queue` may hold: the core's room when the task last looked.
    room: usize,
    queue: VecDeque<OutMessage>,
    /// Packet ids of this generation's incoming messages the owner has stored.
    acks: Vec<u16>,
}

struct Shared {
    outbox: Mutex<Outbox>,
    /// Wakes the task: something in the outbox.
    to_link: Notify,
    /// Wakes the owner: room in the window, or the state changed.
    room_changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Outbox> {
        // Nothing under this lock can leave it half-updated; a poisoned lock is still usable.
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The owner's side of a link; cheap to clone.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Shared>,
}

impl LinkHandle {
    /// Queues `msg` for the current connection without waiting. Returns the generation it
    /// went into.
    pub fn try_publish(&self, msg: &OutMessage) -> Result<u64, PushError> {
        let mut o = self.shared.lock();
        if o.stopped {
            return Err(PushError::Stopped);
        }
        if !o.connected {
            return Err(PushError::NotConnected);
        }
        if o.queue.len() >= o.room {
            return Err(PushError::Full);
        }
        o.queue.push_back(msg.clone());
        let generation = o.generation;
        drop(o);
        self.shared.to_link.notify_one();
        Ok(generation)
    }

    /// How many more messages `try_publish` takes now.
    pub fn room(&self) -> usize {
        let o = self.shared.lock();
        if o.connected && !o.stopped {
            o.room.saturating_sub(o.queue.len())
        } else {
            0
        }
    }

    /// Resolves when room may have appeared (or the link connected, disconnected or
    /// stopped). A wake-up given while nobody waited is kept for the next call.
    pub async fn room_changed(&self) {
        self.shared.room_changed.notified().await
    }

    /// The owner has stored incoming message `packet_id` of `generation`: the link
    /// acknowledges it to the remote. False when that connection is gone.
    pub fn ack_incoming(&self, generation: u64, packet_id: u16) -> bool {
        let mut o = self.shared.lock();
        if o.stopped || !o.connected || o.generation != generation {
            return false;
        }
        if o.acks.len() >= usize::from(u16::MAX) {
            // More than there can be messages waiting: repeated acks; drop the extra.
            return false;
        }
        o.acks.push(packet_id);
        drop(o);
        self.shared.to_link.notify_one();
        true
    }

    /// The generation of the current (or last) connection.
    pub fn generation(&self) -> u64 {
        self.shared.lock().generation
    }

    pub fn is_connected(&self) -> bool {
        let o = self.shared.lock();
        o.connected && !o.stopped
    }
}

/// A started link: the owner's handle, its events, and the task (which ends after a
/// shutdown, or when the events receiver is dropped).
pub struct Link {
    pub handle: LinkHandle,
    pub events: mpsc::Receiver<LinkEvent>,
    pub task: JoinHandle<()>,
}

/// What [`spawn`] would refuse in `cfg`: its options, its TLS server name.
pub fn check(cfg: &LinkConfig) -> Result<Option<ServerName<'static>>, LinkError> {
    cfg.options.validate()?;
    Ok(match &cfg.tls {
        Some(t) => Some(
            ServerName::try_from(t.server_name.clone())
                .map_err(|_| LinkError::ServerName(t.server_name.clone()))?,
        ),
        None => None,
    })
}

/// Starts a link. It connects at once and keeps reconnecting until `shutdown` is true (or its
/// sender is dropped); then it sends DISCONNECT when connected and ends.
pub fn spawn(cfg: LinkConfig, shutdown: watch::Receiver<bool>) -> Result<Link, LinkError> {
    let server_name = check(&cfg)?;
    let shared = Arc::new(Shared {
        outbox: Mutex::new(Outbox::default()),
        to_link: Notify::new(),
        room_changed: Notify::new(),
    });
    let (tx, rx) = mpsc::channel(cfg.events_capacity.max(1));
    let task = Task {
        cfg,
        server_name,
        shared: shared.clone(),
        events: tx,
        shutdown,
        rng: Jitter::seeded(),
    };
    let task = tokio::spawn(task.run());
    Ok(Link {
        handle: LinkHandle { shared },
        events: rx,
        task,
    })
}

/// Why one connection ended, for the reconnect loop.
struct Ended {
    /// It got a successful CONNACK.
    connected: bool,
    reason: CloseReason,
    /// Stop for good: shutdown, or nobody reads the events any more.
    stop: bool,
}

struct Task {
    cfg: LinkConfig,
    server_name: Option<ServerName<'static>>,
    shared: Arc<Shared>,
    events: mpsc::Sender<LinkEvent>,
    shutdown: watch::Receiver<bool>,
    rng: Jitter,
}

/// Resolves when `rx` says stop (true, or its sender is gone).
pub(super) async fn stop_signal(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|&stop| stop).await;
}

impl Task {
    async fn run(mut self) {
        let mut attempt: u32 = 0;
        let (name, host, port) = (self.cfg.name.clone(), self.cfg.host.clone(), self.cfg.port);
        loop {
            if *self.shutdown.borrow() {
                break;
            }
            let ended = self.connect_once().await;
            if ended.stop {
                if ended.connected {
                    tracing::info!(link = %name, %host, port, reason = %ended.reason, "bridge link disconnected");
                }
                break;
            }
            if ended.connected {
                attempt = 0;
            }
            let delay = self.delay(attempt);
            attempt = attempt.saturating_add(1);
            if ended.connected {
                tracing::warn!(link = %name, %host, port, reason = %ended.reason, retry_in = ?delay, "bridge link disconnected");
            } else {
                tracing::warn!(link = %name, %host, port, reason = %ended.reason, retry_in = ?delay, "bridge link could not connect");
                let ev = LinkEvent::ConnectFailed {
                    reason: ended.reason,
                    retry_in: delay,
                };
                if !self.emit(ev).await {
                    break;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop_signal(&mut self.shutdown) => break,
            }
        }
        let mut o = self.shared.lock();
        o.stopped = true;
        o.connected = false;
        o.queue.clear();
        o.acks.clear();
        drop(o);
        self.shared.room_changed.notify_one();
    }

    /// The full-jitter delay before attempt `attempt + 1`.
    fn delay(&mut self, attempt: u32) -> Duration {
        let b = self.cfg.backoff;
        let cap = b
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.min(20)))
            .min(b.max);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.below(nanos.saturating_add(1)))
    }

    /// Sends an event, unless the owner is gone or a shutdown comes first. False: stop.
    async fn emit(&mut self, ev: LinkEvent) -> bool {
        tokio::select! {
            r = self.events.send(ev) => r.is_ok(),
            _ = stop_signal(&mut self.shutdown) => false,
        }
    }

    /// One attempt: open the socket (TCP, then TLS), within the connect timeout, and run the
    /// MQTT connection on it until it ends.
    async fn connect_once(&mut self) -> Ended {
        let timeout = self.cfg.options.connect_timeout;
        let addr = (self.cfg.host.clone(), self.cfg.port);
        let failed = |reason: CloseReason| Ended {
            connected: false,
            reason,
            stop: false,
        };
        let open = async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok::<_, std::io::Error>(tcp)
        };
        let tcp = tokio::select! {
            r = tokio::time::timeout(timeout, open) => match r {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => return failed(CloseReason::Io(format!("connect: {e}"))),
                Err(_) => return failed(CloseReason::Io("connect timed out".into())),
            },
            _ = stop_signal(&mut self.shutdown) => return Ended { connected: false, reason: CloseReason::Shutdown, stop: true },
        };
        match (&self.cfg.tls, &self.server_name) {
            (Some(tls), Some(name)) => {
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let handshake = connector.connect(name.clone(), tcp);
                let stream = tokio::select! {
                    r = tokio::time::timeout(timeout, handshake) => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return failed(CloseReason::Io(format!("TLS: {e}"))),
                        Err(_) => return failed(CloseReason::Io("TLS handshake timed out".into())),
                    },
                    _ = stop_signal(&mut self.shutdown) => return Ended { connected: false, reason: CloseReason::Shutdown, stop: true },
                };
                self.session(stream).await
            }
            _ => self.session(tcp).await,
        }
    }

    /// Runs one MQTT connection over `stream` until it ends. See the module documentation
    /// for the order: outbox into the core, output to the socket, events to the owner, then
    /// wait for the socket, the outbox, the timer or a shutdown.
    async fn session<S: AsyncRead + AsyncWrite + Unpin>(&mut self, stream: S) -> Ended {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut core = ClientCore::new(&self.cfg.options, crate::clock::now());
        let mut rbuf = BytesMut::with_capacity(8 * 1024);
        let mut connected = false;
        let mut write_ok = true;
        let mut stopping = false;
        // Bounds a write the remote does not take: a blocked socket is a dead link.
        let write_timeout = self
            .cfg
            .options
            .keep_alive
            .max(self.cfg.options.connect_timeout);
        let mut generation = 0;
        loop {
            if core.is_connected() {
                for ev in self.feed(&mut core) {
                    if !self.emit(ev).await && !stopping {
                        stopping = true;
                        core.disconnect();
                    }
                }
            }
            while let Some(bytes) = core.poll_transmit() {
                if !write_ok {
                    continue;
                }
                let w = tokio::select! {
                    r = tokio::time::timeout(write_timeout, wr.write_all(&bytes)) => match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(format!("write: {e}")),
                        Err(_) => Err("write timed out".to_string()),
                    },
                    _ = stop_signal(&mut self.shutdown), if !stopping => {
                        stopping = true;
                        Err("shut down during a write".to_string())
                    }
                };
                if let Err(e) = w {
                    write_ok = false;
                    core.connection_lost(CloseReason::Io(e));
                }
            }
            while let Some(ev) = core.poll_event() {
                let ev = match ev {
                    Event::Connected { session_present } => {
                        connected = true;
                        generation = {
                            let mut o = self.shared.lock();
                            o.generation += 1;
                            o.connected = true;
                            o.room = core.room();
                            o.queue.clear();
                            o.acks.clear();
                            o.generation
                        };
                        self.shared.room_changed.notify_one();
                        tracing::info!(link = %self.cfg.name, host = %self.cfg.host, port = self.cfg.port, generation, session_present, window = core.window(), "bridge link connected");
                        LinkEvent::Connected {
                            generation,
                            session_present,
                        }
                    }
                    Event::Acked { token, reason } => LinkEvent::Acked { token, reason },
                    Event::Message(message) => LinkEvent::Message {
                        generation,
                        message,
                    },
                    Event::SubscribeRefused { filter, reason } => {
                        tracing::warn!(link = %self.cfg.name, %filter, reason, "bridge subscription refused by the remote broker");
                        LinkEvent::SubscribeRefused { filter, reason }
                    }
                    Event::Closed(reason) => {
                        {
                            let mut o = self.shared.lock();
                            o.connected = false;
                            o.room = 0;
                            o.queue.clear();
                            o.acks.clear();
                        }
                        self.shared.room_changed.notify_one();
                        if write_ok {
                            // Best effort: let a TLS peer see close_notify.
                            let _ =
                                tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
                        }
                        let stop = stopping || matches!(reason, CloseReason::Shutdown);
                        if connected
                            && !self
                                .emit(LinkEvent::Disconnected {
                                    generation,
                                    reason: reason.clone(),
                                })
                                .await
                        {
                            return Ended {
                                connected,
                                reason,
                                stop: true,
                            };
                        }
                        return Ended {
                            connected,
                            reason,
                            stop,
                        };
                    }
                };
                if !self.emit(ev).await && !stopping {
                    // Shutdown (or nobody listens): say goodbye, then end at Closed.
                    stopping = true;
                    core.disconnect();
                }
            }
            if core.is_connected() {
                let mut o = self.shared.lock();
                let room = core.room();
                let grew = room > o.room;
                o.room = room;
                drop(o);
                if grew {
                    self.shared.room_changed.notify_one();
                }
            }
            if core.is_closed() {
                // Not reached: Closed is the core's last event and returns above.
                return Ended {
                    connected,
                    reason: CloseReason::Shutdown,
                    stop: stopping,
                };
            }
            if stopping {
                core.disconnect();
                continue;
            }
            let timer = core.next_timer();
            rbuf.reserve(8 * 1024);
            tokio::select! {
                r = rd.read_buf(&mut rbuf) => match r {
                    Ok(0) => core.connection_lost(CloseReason::Io("connection closed by the remote broker".into())),
                    Ok(_) => core.handle_input(&mut rbuf, crate::clock::now()),
                    Err(e) => core.connection_lost(CloseReason::Io(format!("read: {e}"))),
                },
                _ = self.shared.to_link.notified() => {}
                _ = sleep_until(timer) => core.handle_timer(crate::clock::now()),
                _ = stop_signal(&mut self.shutdown) => {
                    stopping = true;
                    core.disconnect();
                }
            }
        }
    }

    /// Moves the owner's queued publishes and acknowledgements into the core. Returns the
    /// refusals of messages that can never go out on this link, for the owner.
    fn feed(&mut self, core: &mut ClientCore) -> Vec<LinkEvent> {
        let mut refused = Vec::new();
        let (mut queue, acks) = {
            let mut o = self.shared.lock();
            (std::mem::take(&mut o.queue), std::mem::take(&mut o.acks))
        };
        let now = crate::clock::now();
        for id in acks {
            core.ack_incoming(id, now);
        }
        while let Some(m) = queue.pop_front() {
            match core.publish(
                m.token,
                m.topic.as_str(),
                &m.payload,
                m.qos,
                m.retain,
                &m.properties,
                m.dup,
                now,
            ) {
                Ok(()) => {}
                Err(super::client::PublishError::Full)
                | Err(super::client::PublishError::NotConnected) => {
                    // Not by the outbox's bound; keep the order and try again later.
                    queue.push_front(m);
                    break;
                }
                Err(e) => {
                    tracing::warn!(link = %self.cfg.name, topic = %m.topic, error = %e, "bridge message cannot be sent to the remote broker");
                    // Reported like a refusing acknowledgement, so the owner drops it.
                    refused.push(LinkEvent::Acked {
                        token: m.token,
                        reason: e.reason_code().as_u8(),
                    });
                }
            }
        }
        let mut o = self.shared.lock();
        while let Some(m) = queue.pop_back() {
            o.queue.push_front(m);
        }
        // What the messages just moved took from the window.
        o.room = core.room();
        drop(o);
        refused
    }
}

async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// xorshift64* seeded from the OS (or the clock when that fails): jitter needs spread, not
/// secrecy.
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Jitter {
        let mut seed = [0u8; 8];
        let s = match getrandom::fill(&mut seed) {
            Ok(()) => u64::from_le_bytes(seed),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9E37_79B9_7F4A_7C15),
        };
        Jitter(s | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_under_the_doubling_cap() {
        let mut j = Jitter(12345);
        let b = Backoff::default();
        for attempt in 0..12u32 {
            let cap = b.initial.saturating_mul(2u32.pow(attempt)).min(b.max);
            for _ in 0..50 {
                let nanos = u64::try_from(cap.as_nanos()).unwrap();
                assert!(j.below(nanos + 1) <= nanos);
            }
        }
        // Spread: not all the same.
        let draws: std::collections::HashSet<u64> = (0..20).map(|_| j.below(1000)).collect();
        assert!(draws.len() > 5);
    }
}
