//! The connection's protocol core, without I/O and without a clock of its own.
//!
//! In the style of quinn-proto: the driver (`Io::run` in `io.rs`, or a simulation) owns the
//! socket, the buffers and the timers, and tells the core what happened and when:
//!
//! | call | when | what the core does |
//! |---|---|---|
//! | [`Client::handle_input`] | bytes arrived (already appended to `rbuf`) | decodes and handles every complete packet |
//! | [`Client::poll_output`] | before every wait | moves what may go out now into `wbuf`: acknowledgements whose commits are done, deliveries within the in-flight window, then submits bookkeeping |
//! | [`Client::writable`] | before writing | how much of `wbuf` may be written (the QoS 2 write gate holds the rest) |
//! | [`Client::handle_written`] | `n` bytes were written | remembers the write (stall detection), moves the gate |
//! | [`Client::poll_timeout`] | before every wait | the earliest deadline: keep alive, write stall, a full window the client stopped acknowledging, the credentials' expiry |
//! | [`Client::handle_timeout`] | that deadline passed | closes the connection if a limit ran out |
//! | [`Client::begin_close`], [`Client::end_close`] | the connection ends | what may still go out: earned acknowledgements, then (once the write gate has settled) the v5 DISCONNECT |
//!
//! The core never reads the clock: every `now` comes from its driver, so tests and the
//! simulation drive it on their own time. What it waits for besides bytes and time (commits
//! completing, the outbox filling, a takeover) it exposes as `ready()` futures and try-polls
//! in `poll_output`; a driver that does not await them (the simulation) just calls
//! `poll_output` again.

use super::client::Client;
use super::Close;
use crate::protocol::{encode_disconnect, kind};
use bytes::BytesMut;
use std::time::{Duration, Instant};

impl Client {
    /// Bytes arrived at `now` (the driver appended them to `rbuf`): handles every complete
    /// packet, writing responses into `wbuf`. Complete packets a pause holds back stay in
    /// `rbuf` (see [`Client::throttle_wait`]).
    pub fn handle_input(
        &mut self,
        now: Instant,
        rbuf: &mut BytesMut,
        wbuf: &mut BytesMut,
    ) -> Result<(), Close> {
        self.now = now;
        self.last_read = now;
        self.process_input(rbuf, wbuf)
    }

    /// Everything that may go out at `now`, up to `high_water` bytes of `wbuf`.
    pub fn poll_output(
        &mut self,
        now: Instant,
        wbuf: &mut BytesMut,
        high_water: usize,
    ) -> Result<(), Close> {
        self.now = now;
        self.gate.poll();
        if self.gate.failed {
            // Output waits for a commit the store could not make: it can never go out.
            return Err(Close::StorageFailed);
        }
        self.release_acks(wbuf)?;
        self.fill_from_outbox(wbuf, high_water);
        self.flush_ops();
        Ok(())
    }

    /// How much of a write buffer of `len` bytes may be written now.
    pub fn writable(&self, len: usize) -> usize {
        self.gate.writable(len)
    }

    /// `n` bytes from the front of the write buffer were written at `now`.
    pub fn handle_written(&mut self, now: Instant, n: usize) {
        self.last_write = now;
        self.gate.advanced(n);
    }

    /// A client whose in-flight window is full while messages wait: if it also sends nothing
    /// (no acknowledgement, no ping) for the write timeout, it has stopped reading; the
    /// unacknowledged data sits in the kernel's send buffer, not ours.
    fn window_stuck(&self) -> bool {
        !self.can_take_more() && self.has_waiting()
    }

    /// The keep alive deadline after the last packet: 1.5 times Keep Alive ([MQTT-3.1.2-24]).
    fn keep_alive_limit(&self) -> Option<Duration> {
        (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500))
    }

    fn write_timeout(&self) -> Duration {
        self.limits.write_timeout
    }

    /// The earliest moment the core must be woken even if nothing arrives.
    /// `pending_write`: the driver holds output it could not write yet.
    pub fn poll_timeout(&self, pending_write: bool) -> Option<Instant> {
        let mut next = self.keep_alive_limit().map(|k| self.last_read + k);
        let mut earlier = |at: Instant| next = Some(next.map_or(at, |n: Instant| n.min(at)));
        if pending_write {
            earlier(self.last_write + self.write_timeout());
        }
        if self.window_stuck() {
            earlier(self.last_read + self.write_timeout());
        }
        if let Some(at) = self.credentials_expire() {
            earlier(at);
        }
        next
    }

    /// A deadline from [`Client::poll_timeout`] passed: the close, if a limit ran out.
    pub fn handle_timeout(&mut self, now: Instant, pending_write: bool) -> Result<(), Close> {
        self.now = now;
        if self.credentials_expire().is_some_and(|at| now >= at) {
            // The token it connected with is no longer valid: so is the connection.
            return Err(Close::CredentialsExpired);
        }
        if self
            .keep_alive_limit()
            .is_some_and(|k| now >= self.last_read + k)
        {
            // [MQTT-3.1.2-24] no packet within 1.5 x Keep Alive.
            return Err(Close::KeepAlive);
        }
        if pending_write && now >= self.last_write + self.write_timeout() {
            tracing::debug!(client_id = %self.client_id, "peer stopped reading");
            return Err(Close::WriteStalled);
        }
        if self.window_stuck() && now >= self.last_read + self.write_timeout() {
            tracing::debug!(client_id = %self.client_id, "peer stopped acknowledging with its window full");
            return Err(Close::WriteStalled);
        }
        Ok(())
    }

    /// The connection ends: acknowledgements already earned go into `wbuf` (before the
    /// DISCONNECT), bookkeeping is submitted. The driver then settles the write gate (output
    /// held for a commit goes only if that commit completes) and calls [`Client::end_close`].
    pub fn begin_close(&mut self, wbuf: &mut BytesMut) {
        let _ = self.release_acks(wbuf);
        self.flush_ops();
    }

    /// After the gate settled: the v5 DISCONNECT with `close`'s reason, if it has one and it
    /// fits the client's Maximum Packet Size ([MQTT-3.1.2-24]: else the connection closes
    /// without it), and the last tallies.
    pub fn end_close(&mut self, close: &Close, wbuf: &mut BytesMut) {
        if self.version.is_v5() {
            if let Some(reason) = close.reason() {
                let at = wbuf.len();
                encode_disconnect(wbuf, reason, None);
                if wbuf.len() - at > self.max_packet_out {
                    wbuf.truncate(at);
                } else {
                    self.tally.packets_out[usize::from(kind::DISCONNECT)] += 1;
                }
            }
        }
        self.flush_tally();
    }
}
