//! One task per client connection: it owns the socket and, while attached, the session state.
//! [`serve`] is its whole life: the CONNECT (within `limits.connect_timeout`), the loop that
//! drives the connection (`io.rs`), and the close sequence.
//!
//! Each file of this module holds one concept and says why at its top (docs/architecture.md
//! lists them, with the recipe for adding a packet). The protocol state machine is sans-IO
//! (`core.rs` and what it calls), so the simulation and the core's tests drive the same code
//! without this task, a socket or a clock.

mod asking;
mod client;
mod close;
mod connect;
mod core;
#[cfg(test)]
mod core_tests;
mod drain;
pub mod entry;
mod handlers;
mod io;
mod outbound;
mod pending;
mod responses;
mod shared;
#[cfg(test)]
pub(crate) mod sim;
mod tally;
mod throttle;
mod will;

use crate::broker::Broker;
use crate::protocol::ProtocolError;
use crate::protocol::ReasonCode;
use close::Close;
pub use entry::Entry;
use io::Io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

pub(crate) use throttle::TokenBucket;

/// Serves one client from its first byte to its last.
/// `identity` is a username already authenticated by the transport (a verified TLS client
/// certificate's Common Name with `use_identity_as_username`); `slot` is held for the
/// connection's life (the listener's count of connections).
///
/// Not an `async fn`: one of those keeps each argument twice in its future (as captured and
/// as a local it is moved to), for the connection's whole life. Here the socket is split and
/// wrapped before the future exists, and the `async move` block captures each value once;
/// with `Io::run` made the same way, the task fits jemalloc's 1,536-byte class (was 2,048;
/// `-Zprint-type-sizes`, docs/architecture.md).
/// What accepted a connection: the connection holds it for its whole life (the listener's
/// count of open connections drops when it goes) and names its listener in log lines and in
/// the admin API. Behind the listener's one pointer, so it makes no connection task larger.
pub trait Accepted: Send + 'static {
    /// The listener's name (`[listeners.NAME]`).
    fn listener(&self) -> &'static str;
    /// The listener's settings as of now.
    fn entry(&self) -> Arc<Entry>;
}

/// Where a CONNECT came from, for the log lines and the admin API.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    pub(crate) peer: SocketAddr,
    pub(crate) listener: &'static str,
}

pub fn serve<S, G>(
    stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    identity: Option<String>,
    slot: G,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    G: Accepted,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut io = Io::new(reader, writer, peer);
    async move {
        // Held, not used: dropped with the future.
        let _slot = &slot;
        // This connection's limits for its whole life (a reload applies to later connections).
        let entry = slot.entry();
        let connect_timeout = entry.limits.connect_timeout;
        let max_packet = entry.limits.max_packet_size as usize;
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
                tracing::info!(peer = %io.peer, error = %e, "connection refused before CONNECT");
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
                Box::pin(io.flush_quietly()).await;
                Box::pin(io.drain_before_close()).await;
                return;
            }
            Err(_) => {
                tracing::info!(peer = %io.peer, "no CONNECT within {connect_timeout:?}, closing");
                Box::pin(io.flush_quietly()).await;
                return;
            }
        };
        let (kick_tx, kick_rx) = oneshot::channel();
        let Some(mut client) = Box::pin(connect::accept(
            &broker,
            &mut io.wbuf,
            *packet,
            Origin {
                peer: io.peer,
                listener: slot.listener(),
            },
            kick_tx,
            identity,
            entry,
        ))
        .await
        else {
            // Refused: the CONNACK saying why, then the same graceful close as any refusal.
            Box::pin(io.flush_quietly()).await;
            Box::pin(io.drain_before_close()).await;
            return;
        };
        tracing::info!(
            peer = %io.peer,
            listener = slot.listener(),
            client_id = %client.client_id,
            username = %client.username.as_deref().unwrap_or(""),
            version = client.version.label(),
            keep_alive = client.keep_alive,
            clean_start = client.clean_start,
            "client connected"
        );
        broker.metrics.connected();
        // Packets that came in the same read as CONNECT (a client may pipeline SUBSCRIBE or
        // PUBLISH behind it) are handled at once, not when the next bytes arrive.
        client.held_input = !io.rbuf.is_empty();
        let close = io.run(&mut client, kick_rx).await;
        broker.metrics.disconnected(close.metric());
        if let Close::Protocol(_) = close {
            broker.metrics.protocol_errors.inc();
        }
        tracing::info!(peer = %io.peer, client_id = %client.client_id, reason = %close.describe(), "connection closed");
        // Acknowledgements already earned go out before the DISCONNECT; gated output only once
        // its commit is done (else it is not sent at all).
        client.begin_close(&mut io.wbuf);
        // The closing steps are boxed: they happen once, and inline they would make every
        // connection's task, idle ones included, as large as their futures.
        Box::pin(client.gate.settle(&mut io.wbuf)).await;
        client.end_close(&close, &mut io.wbuf);
        if !matches!(close, Close::WriteStalled | Close::PeerGone(_)) {
            Box::pin(io.flush_quietly()).await;
        }
        // The session goes back (will, registry) before the drain: a reconnect or takeover waits
        // for it and must not also wait out the drain.
        client.finish(close.publishes_will());
        if close.drains() {
            Box::pin(io.drain_before_close()).await;
        }
    }
}
