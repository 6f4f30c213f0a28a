//! Accept loops. Accepting never waits on a client: each connection gets its own task at once
//! (TLS handshakes, when they come, run in that task too), and an accept error never stops the
//! listener — running out of descriptors backs off briefly instead.

use crate::broker::Broker;
use crate::metrics::ListenerKind;
use crate::websocket::{WsOptions, WsStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Descriptors kept back from `limits.max_connections` for listeners, the store (fjall's
/// table-file cache and journal), metrics scrapes and logs.
pub const RESERVED_FDS: u64 = 160;

/// Raises the soft open-file limit to the hard one (a broker's job is to hold sockets) and
/// warns when `max_connections` plus the reserve does not fit. Returns the soft limit.
pub fn raise_fd_limit(max_connections: usize) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    let soft: u64 = lim.rlim_cur;
    if max_connections as u64 + RESERVED_FDS > soft {
        tracing::warn!(
            max_connections,
            open_file_limit = soft,
            reserved = RESERVED_FDS,
            "limits.max_connections does not fit the open-file limit; connections beyond {} will be refused by the OS",
            soft.saturating_sub(RESERVED_FDS)
        );
    }
    soft
}

/// Connections the kernel may hold completed for us before we accept them (the listen
/// backlog; Linux caps it at `net.core.somaxconn`, 4096 by default). `std` and tokio bind
/// with 128, and Mosquitto listens with 100: when more clients than that connect at once (a
/// fleet reconnecting after a restart or a network blip), the kernel drops the surplus
/// handshakes and those clients retry only after a second or more. Measured with 256
/// clients connecting at once (tern-bench `conns`): with a backlog of 128 (Tern) or 100
/// (Mosquitto) about 8,000-9,400 connections/s, hundreds of listen overflows per run
/// (`nstat`: TcpExtListenOverflows); with 4096, 48,800 connections/s.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds an MQTT listener with [`LISTEN_BACKLOG`] (address reuse on, as `std` sets it, so a
/// restart does not wait for the old sockets' TIME_WAIT).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Counts live connections; the counts drop when the guard does.
pub struct ConnectionSlot(Arc<SlotCounts>);

/// What a slot counts in: every listener's connections (bounded by `limits.max_connections`)
/// and its own listener's gauge. One per listener, behind one pointer, so a connection's task
/// is no larger for the per-listener count.
struct SlotCounts {
    all: Arc<AtomicUsize>,
    listener: prometheus::IntGauge,
    /// The listener's name, for its connections' log lines.
    name: &'static str,
}

impl ConnectionSlot {
    fn try_take(counts: &Arc<SlotCounts>, max: usize) -> Option<ConnectionSlot> {
        let count = &counts.all;
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
                Ok(_) => {
                    counts.listener.inc();
                    return Some(ConnectionSlot(counts.clone()));
                }
                Err(now) => current = now,
            }
        }
    }
}

impl crate::connection::Accepted for ConnectionSlot {
    fn listener(&self) -> &'static str {
        self.0.name
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.all.fetch_sub(1, Ordering::AcqRel);
        self.0.listener.dec();
    }
}

/// What a listener does with an accepted, counted socket.
#[derive(Clone)]
pub enum Transport {
    Tcp,
    Tls(Arc<crate::tls::TlsReloader>),
    /// MQTT over WebSockets.
    Ws(Arc<WsOptions>),
    /// MQTT over WebSockets over TLS.
    Wss(Arc<crate::tls::TlsReloader>, Arc<WsOptions>),
}

impl Transport {
    /// The listener's name in metrics.
    pub fn kind(&self) -> ListenerKind {
        match self {
            Transport::Tcp => ListenerKind::Tcp,
            Transport::Tls(_) => ListenerKind::Tls,
            Transport::Ws(_) => ListenerKind::Ws,
            Transport::Wss(..) => ListenerKind::Wss,
        }
    }
}

/// Accept loop shared by every listener.
pub async fn run(
    listener: TcpListener,
    transport: Transport,
    broker: Arc<Broker>,
    connections: Arc<AtomicUsize>,
    mut shutdown: watch::Receiver<bool>,
) {
    // One bucket per listener, holding one second's worth of connections; remade when a
    // reload changes the rate.
    let bucket =
        |rate: u32| crate::connection::TokenBucket::per_second(rate, std::time::Instant::now());
    let counts = Arc::new(SlotCounts {
        all: connections,
        listener: broker.metrics.listener_connections(transport.kind()),
        name: transport.kind().label(),
    });
    let mut connect_rate = broker.limits().max_connect_rate;
    let mut rate = bucket(connect_rate);
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
        let limits = broker.limits();
        let max = limits.max_connections;
        if limits.max_connect_rate != connect_rate {
            connect_rate = limits.max_connect_rate;
            rate = bucket(connect_rate);
        }
        if let Some(bucket) = rate.as_mut() {
            if !bucket.try_take(1.0, std::time::Instant::now()) {
                broker.metrics.refused_connect_rate.inc();
                tracing::info!(%peer, rate = connect_rate, "connection refused: limits.max_connect_rate exceeded");
                drop(stream);
                continue;
            }
        }
        let Some(slot) = ConnectionSlot::try_take(&counts, max) else {
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
        // One spawn per transport, so that each task's future is only as large as its own
        // transport's (a plain TCP connection does not carry room for TLS and WebSocket state:
        // with 10,000 connections that is tens of MiB).
        match transport.clone() {
            Transport::Tcp => {
                // `serve` itself is the task (no wrapping block that would keep a second copy
                // of its arguments in every connection's task); it holds the slot.
                tokio::spawn(crate::connection::serve(stream, peer, broker, None, slot));
            }
            Transport::Tls(tls) => {
                tokio::spawn(async move {
                    if let Some((s, identity)) = tls_handshake(stream, peer, &broker, &tls).await {
                        crate::connection::serve(s, peer, broker, identity, slot).await
                    }
                });
            }
            Transport::Ws(ws) => {
                tokio::spawn(async move {
                    if let Some(s) = ws_handshake(stream, peer, &broker, &ws).await {
                        crate::connection::serve(s, peer, broker, None, slot).await
                    }
                });
            }
            Transport::Wss(tls, ws) => {
                tokio::spawn(async move {
                    let Some((s, identity)) = tls_handshake(stream, peer, &broker, &tls).await
                    else {
                        return;
                    };
                    if let Some(s) = ws_handshake(s, peer, &broker, &ws).await {
                        crate::connection::serve(s, peer, broker, identity, slot).await
                    }
                });
            }
        }
    }
}

/// The WebSocket upgrade, in the connection's own task and bounded by the connect timeout.
/// A refused or failed upgrade is one log line; the HTTP refusal was already sent.
async fn ws_handshake<S>(
    stream: S,
    peer: std::net::SocketAddr,
    broker: &Broker,
    ws: &WsOptions,
) -> Option<WsStream<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timeout = broker.limits().connect_timeout;
    match tokio::time::timeout(timeout, crate::websocket::accept(stream, ws)).await {
        Ok(Ok(s)) => {
            broker.metrics.ws_handshakes.inc();
            Some(s)
        }
        Ok(Err(e)) => {
            broker.metrics.ws_failures.inc();
            tracing::info!(%peer, error = %e, "WebSocket handshake failed");
            None
        }
        Err(_) => {
            broker.metrics.ws_failures.inc();
            tracing::info!(%peer, "WebSocket handshake timed out");
            None
        }
    }
}

/// The TLS handshake, in the connection's own task and bounded by the connect timeout; with
/// `use_identity_as_username`, also the certificate's Common Name.
async fn tls_handshake(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    broker: &Broker,
    tls: &crate::tls::TlsReloader,
) -> Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    Option<String>,
)> {
    let timeout = broker.limits().connect_timeout;
    let tls_stream = match tokio::time::timeout(timeout, tls.acceptor().accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            broker.metrics.tls_failures.inc();
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            broker.metrics.tls_failures.inc();
            tracing::info!(%peer, "TLS handshake timed out");
            return None;
        }
    };
    broker.metrics.tls_handshakes.inc();
    let identity = if tls.settings().use_identity_as_username {
        let (_, conn) = tls_stream.get_ref();
        match conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(crate::tls::peer_common_name)
        {
            Some(cn) => Some(cn),
            None => {
                tracing::info!(%peer, "connection refused: no client certificate Common Name to use as username");
                broker.metrics.refused_auth.inc();
                broker.metrics.auth_failures.inc();
                return None;
            }
        }
    } else {
        None
    };
    Some((tls_stream, identity))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More clients than `std`'s backlog of 128 connect at once while nothing accepts (a
    /// broker busy for a moment, or a reconnect storm): the kernel completes every handshake
    /// and queues them, where a 128 backlog drops the SYNs beyond it and those clients retry
    /// only a second later.
    #[tokio::test]
    async fn a_burst_of_connections_beyond_128_waits_in_the_backlog() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let attempts: Vec<_> = (0..300)
            .map(|_| {
                tokio::spawn(tokio::time::timeout(
                    Duration::from_millis(800),
                    tokio::net::TcpStream::connect(addr),
                ))
            })
            .collect();
        let mut connected = 0;
        for a in attempts {
            if let Ok(Ok(Ok(_))) = a.await {
                connected += 1;
            }
        }
        assert_eq!(connected, 300, "handshakes dropped by the listen backlog");
        drop(listener);
    }
}
