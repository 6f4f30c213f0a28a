//! One task per client connection: it owns the socket and, while attached, the session state.
//!
//! The loop waits on whichever comes first — bytes from the client, room to write, new
//! deliveries in the session's outbox, a commit completing, a timer, a takeover or shutdown —
//! and never blocks on one while another is ready: reads and writes are separate branches, so a
//! client that stops reading is caught by the write-stall timer instead of stalling the task.
//! Generic over the stream, so TLS and WebSocket streams slot in unchanged.

mod connect;
mod core;
#[cfg(test)]
mod core_tests;
mod handlers;
mod outbound;
mod pending;
mod shared;
#[cfg(test)]
pub(crate) mod sim;

use crate::broker::Broker;
use crate::error::ProtocolError;
use crate::protocol::{decode_packet, DecodeOutcome, Packet, ReasonCode};
use crate::session::registry::Kick;
use bytes::{Buf, BytesMut};
use handlers::Client;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// Stop reading from a client while this much output is waiting for it: its acknowledgements
/// would otherwise pile up in our memory (inbound back-pressure).
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// Read buffer sizing: an idle connection starts (and falls back to) a small buffer; a busy one
/// doubles its read size whenever a read fills it, so a burst is taken in few syscalls while
/// thousands of idle clients cost little memory.
const READ_MIN: usize = 128;
const READ_MAX: usize = 64 * 1024;
/// How long a connection being taken over waits for input still on its way (see
/// `Io::drain_input`).
const TAKEOVER_DRAIN: Duration = Duration::from_millis(20);

/// How long a connection the broker ends keeps reading (and discarding) what the client still
/// sends after our last packet and our FIN. Closing a socket with unread input makes the kernel
/// answer with a TCP RST, and a client that is still writing then gets EPIPE/ECONNRESET and
/// typically never reads the DISCONNECT (or refusing CONNACK) that says why. A well-behaved
/// client reads it and closes within a round trip; the bound is for those that never do.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// At most this many connections drain at once, process-wide; past it a connection is closed
/// at once (as before draining existed). A flood of misbehaving clients must not be able to
/// hold [`DRAIN_LIMIT`] worth of file descriptors each without bound.
const MAX_DRAINING: usize = 1024;
/// Read size while draining: the input is thrown away, so a small reused buffer will do.
const DRAIN_READ: usize = 4096;
/// Connections draining right now (see [`MAX_DRAINING`]).
static DRAINING: AtomicUsize = AtomicUsize::new(0);

/// A claim on one of the [`MAX_DRAINING`] draining places, given back on drop.
struct DrainSlot<'a>(&'a AtomicUsize);

impl<'a> DrainSlot<'a> {
    /// Claims a place if fewer than `max` are taken (never over-counts, even under races).
    fn try_take(count: &'a AtomicUsize, max: usize) -> Option<DrainSlot<'a>> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| DrainSlot(count))
    }
}

impl Drop for DrainSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A token bucket: `rate` tokens per second, holding at most one second's worth. `take` may
/// run it into debt (a packet already read must be handled); the owner then waits
/// [`TokenBucket::wait`] before taking more.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, now: std::time::Instant) -> TokenBucket {
        TokenBucket {
            rate,
            tokens: rate,
            last: now,
        }
    }

    fn refill(&mut self, now: std::time::Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
    }

    /// Takes `n` tokens if that many are there.
    pub(crate) fn try_take(&mut self, n: f64, now: std::time::Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, going into debt if needed.
    pub(crate) fn take(&mut self, n: f64, now: std::time::Instant) {
        self.refill(now);
        self.tokens -= n;
    }

    /// How long until the bucket is out of debt (None: it is not in debt).
    pub(crate) fn wait(&mut self, now: std::time::Instant) -> Option<Duration> {
        self.refill(now);
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum Close {
    /// DISCONNECT from the client: no will.
    Normal,
    /// v5 DISCONNECT 0x04: publish the will.
    NormalWithWill,
    /// The socket closed or failed without DISCONNECT.
    PeerGone(&'static str),
    Protocol(ProtocolError),
    KeepAlive,
    TakenOver,
    WriteStalled,
    Shutdown,
    /// The store could not keep what this client's acknowledgements depend on.
    StorageFailed,
}

impl Close {
    /// The v5 DISCONNECT reason to send before closing, if any.
    fn reason(&self) -> Option<ReasonCode> {
        match self {
            Close::Protocol(e) => Some(e.reason_code()),
            Close::KeepAlive => Some(ReasonCode::KeepAliveTimeout),
            Close::TakenOver => Some(ReasonCode::SessionTakenOver),
            Close::Shutdown => Some(ReasonCode::ServerShuttingDown),
            Close::StorageFailed => Some(ReasonCode::ImplementationSpecificError),
            _ => None,
        }
    }

    /// Whether the client may still be writing when we close, so that its input is drained
    /// before the socket is closed (see [`DRAIN_LIMIT`]). Not for a peer that is gone or
    /// stopped reading (nothing to protect; it would only hold the descriptor), nor after the
    /// client's own DISCONNECT (it has finished writing).
    fn drains(&self) -> bool {
        !matches!(
            self,
            Close::Normal | Close::NormalWithWill | Close::PeerGone(_) | Close::WriteStalled
        )
    }

    /// One phrase for the disconnect log line.
    fn describe(&self) -> String {
        match self {
            Close::Normal => "client disconnected".into(),
            Close::NormalWithWill => "client disconnected with will".into(),
            Close::PeerGone(why) => (*why).into(),
            Close::Protocol(e) => e.to_string(),
            Close::KeepAlive => "keep alive timeout".into(),
            Close::TakenOver => "session taken over".into(),
            Close::WriteStalled => "client stopped reading".into(),
            Close::Shutdown => "server shutting down".into(),
            Close::StorageFailed => "storage failure".into(),
        }
    }

    /// Whether the Will Message is published ([MQTT-3.1.2-8]: not after a normal DISCONNECT).
    fn publishes_will(&self) -> bool {
        !matches!(self, Close::Normal)
    }
}

/// Serves one client from its first byte to its last.
/// `identity` is a username already authenticated by the transport (a verified TLS client
/// certificate's Common Name with `use_identity_as_username`).
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
    identity: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut io = Io {
        reader,
        writer,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        peer,
    };
    // This connection's limits for its whole life (a reload applies to later connections).
    let limits = broker.limits();
    let connect_timeout = limits.connect_timeout;
    let max_packet = limits.max_packet_size as usize;
    let packet = match tokio::time::timeout(
        connect_timeout,
        Box::pin(io.read_connect(&broker, max_packet)),
    )
    .await
    {
        Ok(Ok(Some(packet))) => packet,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            broker.metrics.protocol_errors.inc();
            broker.metrics.refused_protocol.inc();
            tracing::info!(%peer, error = %e, "connection refused before CONNECT");
            if let ProtocolError::UnsupportedProtocolVersion(_) = e {
                // [MQTT-3.1.2-2] CONNACK 0x01 (3.1.1 form: we cannot speak the client's).
                crate::protocol::encode_connack(
                    &mut io.wbuf,
                    crate::protocol::ProtocolVersion::V3_1_1,
                    false,
                    ReasonCode::UnsupportedProtocolVersion,
                    &crate::protocol::Properties::default(),
                );
            }
            // A clean close (FIN; over WebSockets a close frame) rather than a dropped socket,
            // and the client's further input read, so the refusal is not lost to a reset.
            io.flush_quietly().await;
            io.drain_before_close().await;
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "no CONNECT within {connect_timeout:?}, closing");
            io.flush_quietly().await;
            return;
        }
    };
    let (kick_tx, kick_rx) = oneshot::channel();
    let Some(mut client) = Box::pin(connect::accept(
        &broker,
        &mut io.wbuf,
        *packet,
        peer,
        kick_tx,
        identity,
        limits,
    ))
    .await
    else {
        // Refused: the CONNACK saying why, then the same graceful close as any refusal.
        io.flush_quietly().await;
        io.drain_before_close().await;
        return;
    };
    tracing::info!(
        %peer,
        client_id = %client.client_id,
        version = client.version.label(),
        clean_start = client.clean_start,
        "client connected"
    );
    broker.metrics.connected();
    // Packets that came in the same read as CONNECT (a client may pipeline SUBSCRIBE or
    // PUBLISH behind it) are handled at once, not when the next bytes arrive.
    client.held_input = !io.rbuf.is_empty();
    let close = io.run(&mut client, kick_rx, shutdown).await;
    broker.metrics.connections.dec();
    if let Close::Protocol(_) = close {
        broker.metrics.protocol_errors.inc();
    }
    tracing::info!(%peer, client_id = %client.client_id, reason = %close.describe(), "connection closed");
    // Acknowledgements already earned go out before the DISCONNECT; gated output only once
    // its commit is done (else it is not sent at all).
    client.begin_close(&mut io.wbuf);
    client.gate.settle(&mut io.wbuf).await;
    client.end_close(&close, &mut io.wbuf);
    if !matches!(close, Close::WriteStalled | Close::PeerGone(_)) {
        io.flush_quietly().await;
    }
    // The session goes back (will, registry) before the drain: a reconnect or takeover waits
    // for it and must not also wait out the drain.
    client.finish(close.publishes_will());
    if close.drains() {
        io.drain_before_close().await;
    }
}

struct Io<R, W> {
    reader: R,
    writer: W,
    rbuf: BytesMut,
    wbuf: BytesMut,
    peer: SocketAddr,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Io<R, W> {
    /// Reads until the first packet, which must be CONNECT ([MQTT-3.1.0-1]).
    async fn read_connect(
        &mut self,
        broker: &Broker,
        max: usize,
    ) -> Result<Option<Box<Packet>>, ProtocolError> {
        loop {
            match decode_packet(&mut self.rbuf, None, max)? {
                DecodeOutcome::Packet(p, n) => {
                    broker.metrics.bytes_received.inc_by(n as u64);
                    return Ok(Some(Box::new(p)));
                }
                DecodeOutcome::Incomplete(need) => {
                    self.rbuf.reserve(need.unwrap_or(0).max(READ_MIN));
                    match self.reader.read_buf(&mut self.rbuf).await {
                        Ok(0) | Err(_) => return Ok(None),
                        Ok(_) => {}
                    }
                }
            }
        }
    }

    /// Best-effort write of whatever is buffered (a refusal CONNACK or a DISCONNECT).
    async fn flush_quietly(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.writer.write_all(&self.wbuf).await;
            let _ = self.writer.flush().await;
            let _ = self.writer.shutdown().await;
        })
        .await;
        self.wbuf.clear();
    }

    /// After [`Io::flush_quietly`] (our last packet and FIN are out): reads and discards the
    /// client's input until it closes, the read fails, or [`DRAIN_LIMIT`] passes, so closing
    /// does not reset the connection under a client that is still writing (see
    /// [`DRAIN_LIMIT`]). Over [`MAX_DRAINING`] concurrent drains it returns at once.
    async fn drain_before_close(&mut self) {
        self.drain_for(DRAIN_LIMIT, &DRAINING, MAX_DRAINING).await;
    }

    /// [`Io::drain_before_close`] with its bound and cap passed in (tests use small ones).
    /// Returns whether it drained at all (false: over the cap).
    async fn drain_for(&mut self, limit: Duration, count: &AtomicUsize, max: usize) -> bool {
        let Some(_slot) = DrainSlot::try_take(count, max) else {
            tracing::debug!(peer = %self.peer, "too many connections draining: closing at once");
            return false;
        };
        self.rbuf.clear();
        let mut discarded = 0usize;
        let ended = tokio::time::timeout(limit, async {
            loop {
                if self.rbuf.capacity() < DRAIN_READ {
                    self.rbuf.reserve(DRAIN_READ);
                }
                match self.reader.read_buf(&mut self.rbuf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        discarded += n;
                        self.rbuf.clear();
                    }
                }
            }
        })
        .await;
        tracing::debug!(
            peer = %self.peer,
            discarded,
            peer_closed = ended.is_ok(),
            "drained input before closing"
        );
        self.rbuf = BytesMut::new();
        true
    }

    /// Before handing the session over: handle what the client already sent (typically the
    /// PUBACK it wrote just before reconnecting, or the DISCONNECT it sent before connecting
    /// again), so the new connection does not re-send messages that were in fact
    /// acknowledged, and a normal DISCONNECT is not mistaken for a lost connection (which
    /// would publish the will, [MQTT-3.14.4-3]). Returns the close the input asked for, if
    /// any.
    ///
    /// Data the client wrote before its new CONNECT is already in this socket's receive
    /// buffer on loopback, but the runtime may not have seen it become readable yet, so each
    /// read may wait [`TAKEOVER_DRAIN`]: long enough for the reactor to report it, short
    /// enough not to slow the takeover of a dead connection noticeably.
    async fn drain_input(&mut self, client: &mut Client) -> Option<Close> {
        for _ in 0..16 {
            if let Err(close) = client.process_input(&mut self.rbuf, &mut self.wbuf) {
                return Some(close);
            }
            self.rbuf.reserve(READ_MIN);
            match tokio::time::timeout(TAKEOVER_DRAIN, self.reader.read_buf(&mut self.rbuf)).await {
                Ok(Ok(n)) if n > 0 => continue,
                _ => return client.process_input(&mut self.rbuf, &mut self.wbuf).err(),
            }
        }
        None
    }

    /// The driver: waits on whichever comes first (bytes from the client, room to write, new
    /// deliveries, a commit completing, a timer, a takeover or shutdown) and hands it to the
    /// core with the time. Reads and writes are separate branches, so a client that stops
    /// reading is caught by the write-stall timer instead of stalling the task.
    async fn run(
        &mut self,
        client: &mut Client,
        mut kick: oneshot::Receiver<Kick>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Close {
        let broker = client.broker.clone();
        let timer = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(timer);
        let mut timer_armed = false;
        let mut read_size = READ_MIN;
        let mut kick_live = true;
        // Publish rate limiting: while the client's budget is spent, its socket is not read
        // (TCP pushes back on it) and this timer fires when the budget is back.
        let throttle = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(throttle);
        if *shutdown.borrow() {
            return Close::Shutdown;
        }
        loop {
            let now = Instant::now();
            if let Err(close) = client.poll_output(now.into_std(), &mut self.wbuf, WRITE_HIGH_WATER)
            {
                return close;
            }
            // One timer covers keep alive and write stall. It is moved only when a deadline
            // earlier than the armed one appears (a stall), not on every packet: a later keep
            // alive deadline is picked up when the timer fires.
            if let Some(at) = client.poll_timeout(!self.wbuf.is_empty()) {
                let at = Instant::from_std(at);
                if !timer_armed || at < timer.deadline() {
                    timer.as_mut().reset(at);
                    timer_armed = true;
                }
            }
            let throttled = match client.throttle_wait() {
                Some(wait) => {
                    throttle
                        .as_mut()
                        .reset(now + wait.max(Duration::from_millis(1)));
                    true
                }
                None => false,
            };
            if !throttled && client.held_input {
                // The pause ended (e.g. back-pressure eased between two looks): handle what
                // was held back now; waiting for the socket could wait forever.
                if let Err(close) =
                    client.handle_input(now.into_std(), &mut self.rbuf, &mut self.wbuf)
                {
                    return close;
                }
                continue;
            }
            let can_read = self.wbuf.len() < WRITE_HIGH_WATER && !throttled;
            let store_behind = client.ops_commit.waiting();
            let outbox_open =
                !store_behind && client.can_take_more() && self.wbuf.len() < WRITE_HIGH_WATER;
            let waiting_commit = client.acks.waiting();
            let spare = self.rbuf.capacity() - self.rbuf.len();
            if spare < read_size {
                self.rbuf.reserve(read_size);
            }
            let offered = self.rbuf.capacity() - self.rbuf.len();
            // Output behind an open gate waits for the commit that makes it safe to send.
            let writable = client.writable(self.wbuf.len());
            let wbuf = &self.wbuf[..writable];
            let gated = client.gate.waiting();
            tokio::select! {
                k = &mut kick, if kick_live => match k {
                    Ok(Kick::TakenOver) => {
                        return match self.drain_input(client).await {
                            // The client said goodbye before it connected again.
                            Some(close @ (Close::Normal | Close::NormalWithWill)) => close,
                            _ => Close::TakenOver,
                        };
                    }
                    Err(_) => kick_live = false,
                },
                _ = shutdown.changed() => return Close::Shutdown,
                r = self.writer.write(wbuf), if !wbuf.is_empty() => match r {
                    Ok(0) => return Close::PeerGone("write returned 0"),
                    Ok(n) => {
                        broker.metrics.bytes_sent.inc_by(n as u64);
                        self.wbuf.advance(n);
                        client.handle_written(Instant::now().into_std(), n);
                        if self.wbuf.is_empty() {
                            self.wbuf.clear();
                        }
                    }
                    Err(_) => return Close::PeerGone("write failed"),
                },
                r = self.reader.read_buf(&mut self.rbuf), if can_read => match r {
                    Ok(0) => return Close::PeerGone("connection closed by peer"),
                    Ok(n) => {
                        if n == offered && read_size < READ_MAX {
                            read_size *= 2;
                        }
                        let now = Instant::now().into_std();
                        if let Err(close) = client.handle_input(now, &mut self.rbuf, &mut self.wbuf) {
                            return close;
                        }
                        if client.take_routed() {
                            // Let the subscribers we just woke (queued on this worker) write
                            // their deliveries before we write our acknowledgements: the
                            // message's latency, not the PUBACK's, is what users feel.
                            tokio::task::yield_now().await;
                        }
                    }
                    Err(_) => return Close::PeerGone("read failed"),
                },
                _ = &mut throttle, if throttled => {
                    // The budget refilled (or back-pressure eased): handle what was read but
                    // held back.
                    let now = Instant::now().into_std();
                    if let Err(close) = client.handle_input(now, &mut self.rbuf, &mut self.wbuf) {
                        return close;
                    }
                    if client.take_routed() {
                        tokio::task::yield_now().await;
                    }
                }
                _ = client.handle.outbox.ready(), if outbox_open => {}
                _ = client.acks.ready(), if waiting_commit => {}
                _ = client.gate.ready(), if gated => {}
                _ = client.ops_commit.ready(), if store_behind => {}
                _ = &mut timer, if timer_armed => {
                    timer_armed = false;
                    let pending_write = !self.wbuf.is_empty();
                    if let Err(close) = client.handle_timeout(Instant::now().into_std(), pending_write) {
                        if let Close::WriteStalled = close {
                            tracing::debug!(peer = %self.peer, "write stalled");
                        }
                        return close;
                    }
                    // Idle: give back buffer memory an idle connection does not need.
                    if self.rbuf.is_empty() && self.rbuf.capacity() > READ_MIN {
                        self.rbuf = BytesMut::new();
                        read_size = READ_MIN;
                    }
                    if self.wbuf.is_empty() && self.wbuf.capacity() > READ_MAX {
                        self.wbuf = BytesMut::new();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, DuplexStream, ReadHalf, WriteHalf};

    type TestIo = Io<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>;

    fn io() -> (TestIo, DuplexStream) {
        let (ours, theirs) = duplex(1024);
        let (reader, writer) = tokio::io::split(ours);
        let io = Io {
            reader,
            writer,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
        };
        (io, theirs)
    }

    #[test]
    fn drain_slots_are_capped_and_given_back() {
        let count = AtomicUsize::new(0);
        let a = DrainSlot::try_take(&count, 2);
        let b = DrainSlot::try_take(&count, 2);
        assert!(a.is_some() && b.is_some());
        assert!(DrainSlot::try_take(&count, 2).is_none(), "over the cap");
        drop(a);
        assert_eq!(count.load(Ordering::Acquire), 1);
        assert!(
            DrainSlot::try_take(&count, 2).is_some(),
            "a place was given back"
        );
        drop(b);
        assert_eq!(count.load(Ordering::Acquire), 0);
    }

    #[test]
    fn which_closes_drain() {
        assert!(Close::Protocol(ProtocolError::ReceiveMaximumExceeded).drains());
        assert!(Close::KeepAlive.drains());
        assert!(Close::TakenOver.drains());
        assert!(Close::Shutdown.drains());
        assert!(Close::StorageFailed.drains());
        assert!(!Close::Normal.drains(), "the client said it is done");
        assert!(!Close::NormalWithWill.drains());
        assert!(!Close::PeerGone("x").drains(), "nobody left to read for");
        assert!(
            !Close::WriteStalled.drains(),
            "a stuck peer would only hold the socket"
        );
    }

    /// The FIN goes out first, the client's late writes are read (not refused), and the drain
    /// ends as soon as the client closes, well before the bound.
    #[tokio::test]
    async fn drain_reads_until_the_client_closes() {
        let (mut io, mut client) = io();
        io.wbuf.extend_from_slice(&[0xe0, 0x02, 0x93, 0x00]);
        io.flush_quietly().await;
        let count = AtomicUsize::new(0);
        let writer = tokio::spawn(async move {
            for _ in 0..20 {
                client
                    .write_all(&[0xc0, 0x00])
                    .await
                    .expect("broker still reads");
            }
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            assert_eq!(got, [0xe0, 0x02, 0x93, 0x00], "DISCONNECT, then EOF");
        });
        let started = std::time::Instant::now();
        assert!(io.drain_for(Duration::from_secs(10), &count, 1).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        writer.await.expect("client task");
        assert_eq!(count.load(Ordering::Acquire), 0, "slot given back");
    }

    /// A client that never stops writing is cut off at the bound.
    #[tokio::test]
    async fn drain_stops_at_the_bound() {
        let (mut io, mut client) = io();
        io.flush_quietly().await;
        let count = AtomicUsize::new(0);
        let writer = tokio::spawn(async move {
            // Bounded: the broker side goes away after 100 ms.
            for _ in 0..1_000_000 {
                if client.write_all(&[0u8; 64]).await.is_err() {
                    return true;
                }
                tokio::task::yield_now().await;
            }
            false
        });
        let started = std::time::Instant::now();
        assert!(io.drain_for(Duration::from_millis(100), &count, 1).await);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(5));
        drop(io);
        assert!(
            writer.await.expect("client task"),
            "the writer saw the close"
        );
    }

    #[tokio::test]
    async fn over_the_cap_closes_at_once() {
        let (mut io, _client) = io();
        let count = AtomicUsize::new(1);
        let started = std::time::Instant::now();
        assert!(!io.drain_for(Duration::from_secs(10), &count, 1).await);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            count.load(Ordering::Acquire),
            1,
            "someone else's slot untouched"
        );
    }
}
