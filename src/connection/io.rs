//! The tokio driver of one connection: [`Io`] owns the socket halves and the read and write
//! buffers, and [`Io::run`] feeds the sans-IO core (`core.rs`) what happened and when.
//!
//! The loop waits on whichever comes first — bytes from the client, room to write, new
//! deliveries in the session's outbox, a commit completing, a timer, a takeover or shutdown —
//! and never blocks on one while another is ready: reads and writes are separate branches, so a
//! client that stops reading is caught by the write-stall timer instead of stalling the task.
//! Generic over the stream, so TLS and WebSocket streams slot in unchanged. Everything the
//! loop decides (what to send, when to time out, when to pause reading) is the core's; this file
//! only waits, reads, writes and sizes buffers, which is why the simulation can replace it.

use super::client::Client;
use super::close::Close;
use crate::broker::Broker;
use crate::protocol::ProtocolError;
use crate::protocol::{decode_packet, DecodeOutcome, Packet};
use crate::session::registry::Kick;
use bytes::{Buf, BytesMut};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
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

pub(super) struct Io<R, W> {
    pub(super) reader: R,
    pub(super) writer: W,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
    pub(super) peer: SocketAddr,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Io<R, W> {
    pub(super) fn new(reader: R, writer: W, peer: SocketAddr) -> Io<R, W> {
        Io {
            reader,
            writer,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            peer,
        }
    }

    /// Reads until the first packet, which must be CONNECT ([MQTT-3.1.0-1]).
    pub(super) async fn read_connect(
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
    pub(super) async fn flush_quietly(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.writer.write_all(&self.wbuf).await;
            let _ = self.writer.flush().await;
            let _ = self.writer.shutdown().await;
        })
        .await;
        self.wbuf.clear();
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
    ///
    /// A plain `fn` returning an `async move` block rather than an `async fn`, which would keep
    /// its arguments twice in its future, for the reason given at `serve`.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    pub(super) fn run<'a>(
        &'a mut self,
        client: &'a mut Client,
        mut kick: oneshot::Receiver<Kick>,
    ) -> impl std::future::Future<Output = Close> + 'a {
        async move {
            let broker = client.broker.clone();
            let timer = tokio::time::sleep(Duration::from_secs(1));
            tokio::pin!(timer);
            let mut timer_armed = false;
            let mut read_size = READ_MIN;
            let mut kick_live = true;
            // Publish rate limiting: while the client's budget is spent, its socket is not read
            // (TCP pushes back on it) and this timer fires when the budget is back.
            // Boxed and made on first use: most connections are never throttled, and inline it
            // would be in every connection's task.
            let mut throttle: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
            loop {
                let now = Instant::now();
                if let Err(close) =
                    client.poll_output(now.into_std(), &mut self.wbuf, WRITE_HIGH_WATER)
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
                        let at = now + wait.max(Duration::from_millis(1));
                        match throttle.as_mut() {
                            Some(t) => t.as_mut().reset(at),
                            None => throttle = Some(Box::pin(tokio::time::sleep_until(at))),
                        }
                        true
                    }
                    None => false,
                };
                // A packet waiting for the authorisation service (`asking.rs`).
                let asking = client.ask();
                let answering = client.waiting_answers();
                if !throttled && client.held_input && !answering {
                    // The pause ended (e.g. back-pressure eased between two looks): handle what
                    // was held back now; waiting for the socket could wait forever.
                    if let Err(close) =
                        client.handle_input(now.into_std(), &mut self.rbuf, &mut self.wbuf)
                    {
                        return close;
                    }
                    continue;
                }
                let can_read = self.wbuf.len() < WRITE_HIGH_WATER && !throttled && !answering;
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
                            // Boxed: once per connection at most, and inline it would be in every
                            // connection's task.
                            return match Box::pin(self.drain_input(client)).await {
                                // The client said goodbye before it connected again.
                                Some(close @ (Close::Normal | Close::NormalWithWill)) => close,
                                _ => Close::TakenOver,
                            };
                        }
                        // `Registry::close`: the broker is shutting down.
                        Ok(Kick::Shutdown) => return Close::Shutdown,
                        Ok(Kick::Admin) => return Close::Administrative,
                        Err(_) => kick_live = false,
                    },
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
                    _ = async { if let Some(t) = throttle.as_mut() { t.as_mut().await } }, if throttled => {
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
                    answers = super::asking::answers(&mut client.extras), if asking => {
                        let now = Instant::now().into_std();
                        if let Err(close) = client.handle_answers(now, answers, &mut self.rbuf, &mut self.wbuf) {
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
}
