//! Accept loops. Accepting never waits on a client: each connection gets its own task at once
//! (TLS handshakes, when they come, run in that task too), and an accept error never stops the
//! listener — running out of descriptors backs off briefly instead.

use crate::broker::Broker;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Counts live connections; the count drops when the guard does.
pub struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn try_take(count: &Arc<AtomicUsize>, max: usize) -> Option<ConnectionSlot> {
        let mut current = count.load(Ordering::Relaxed);
        loop {
            if current >= max {
                return None;
            }
            match count.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(ConnectionSlot(count.clone())),
                Err(now) => current = now,
            }
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Plain TCP listener.
pub async fn run_tcp(
    listener: TcpListener,
    broker: Arc<Broker>,
    connections: Arc<AtomicUsize>,
    mut shutdown: watch::Receiver<bool>,
) {
    let max = broker.config.limits.max_connections;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE/ENFILE and friends: the condition passes as connections close.
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = ConnectionSlot::try_take(&connections, max) else {
            broker.metrics.refused_max_connections.inc();
            tracing::info!(%peer, max, "connection refused: limits.max_connections reached");
            drop(stream);
            continue;
        };
        // A lone PUBACK must not wait for Nagle; dead peers are found by TCP keepalive even
        // when the client set MQTT keep alive to 0.
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(60))
                .with_interval(Duration::from_secs(10)),
        );
        let broker = broker.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            crate::connection::serve(stream, peer, broker, shutdown).await;
        });
    }
}
