//! The last step of a close the broker decides: after our last packet and our FIN, the client's
//! input is read and thrown away until it closes too ([`DRAIN_LIMIT`] says why), within a bound
//! and a process-wide cap. Which closes drain is `Close::drains`; `serve` drains only after
//! the session went back to the registry, so a reconnect never waits out a drain.

use super::io::Io;
use bytes::BytesMut;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

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

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Io<R, W> {
    /// After [`Io::flush_quietly`] (our last packet and FIN are out): reads and discards the
    /// client's input until it closes, the read fails, or [`DRAIN_LIMIT`] passes, so closing
    /// does not reset the connection under a client that is still writing (see
    /// [`DRAIN_LIMIT`]). Over [`MAX_DRAINING`] concurrent drains it returns at once.
    pub(super) async fn drain_before_close(&mut self) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{duplex, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

    type TestIo = Io<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>;

    fn io() -> (TestIo, DuplexStream) {
        let (ours, theirs) = duplex(1024);
        let (reader, writer) = tokio::io::split(ours);
        let io = Io::new(reader, writer, SocketAddr::from(([127, 0, 0, 1], 1)));
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
