//! Accept loops. Accepting never waits on a client: each connection gets its own task at once
//! (TLS handshakes, when they come, run in that task too), and an accept error never stops the
//! listener — running out of descriptors backs off briefly instead.

use crate::broker::Broker;
use crate::config::ListenerConfig;
use crate::connection::Entry;
use crate::websocket::{WsOptions, WsStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
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

/// A listener the broker opened: its name and kind, the address it is bound to, its settings
/// as its connections see them, and (TLS, WSS) its certificates.
pub struct Opened {
    pub kind: crate::config::listeners::Kind,
    pub addr: std::net::SocketAddr,
    pub door: Arc<Door>,
    pub tls: Option<Arc<crate::tls::TlsReloader>>,
}

impl Opened {
    pub fn name(&self) -> &'static str {
        self.door.name()
    }
}

/// Counts live connections; the counts drop when the guard does.
pub struct ConnectionSlot(Arc<Door>);

/// One listener as its connections see it: what a slot counts in (every listener's
/// connections, bounded by `limits.max_connections`, and its own, bounded by its
/// `[listeners.NAME.limits] max_connections`), and the settings it hands them. One per
/// listener, behind one pointer, so a connection's task is no larger for it.
pub struct Door {
    all: Arc<AtomicUsize>,
    mine: AtomicUsize,
    open: prometheus::IntGauge,
    /// The listener's name, for its connections' log lines. Listener names live as long as
    /// the process (adding one takes a restart), so the few bytes are leaked once rather than
    /// reference-counted in every log call.
    name: &'static str,
    /// This listener's settings; a reload replaces them for later connections.
    entry: RwLock<Arc<Entry>>,
    /// `[listeners.NAME.limits] max_connections`; `None`: only the broker-wide bound.
    max_mine: RwLock<Option<usize>>,
}

impl Door {
    pub fn new(
        name: &str,
        l: &ListenerConfig,
        config: &crate::config::Config,
        all: Arc<AtomicUsize>,
        open: prometheus::IntGauge,
    ) -> Arc<Door> {
        let name: &'static str = Box::leak(name.to_string().into_boxed_str());
        Arc::new(Door {
            all,
            mine: AtomicUsize::new(0),
            open,
            name,
            entry: RwLock::new(Arc::new(Entry::of(name, l, config))),
            max_mine: RwLock::new(l.limits.as_ref().and_then(|o| o.max_connections)),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// A reload: later connections get `l`'s settings under `config`.
    pub fn update(&self, l: &ListenerConfig, config: &crate::config::Config) {
        *self.entry.write().unwrap_or_else(PoisonError::into_inner) =
            Arc::new(Entry::of(self.name, l, config));
        *self
            .max_mine
            .write()
            .unwrap_or_else(PoisonError::into_inner) =
            l.limits.as_ref().and_then(|o| o.max_connections);
    }

    pub fn entry(&self) -> Arc<Entry> {
        self.entry
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn max_mine(&self) -> Option<usize> {
        *self.max_mine.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Which bound a new connection would cross, if any.
    fn try_take(door: &Arc<Door>, max: usize) -> Result<ConnectionSlot, &'static str> {
        if let Some(mine) = door.max_mine() {
            let mut current = door.mine.load(Ordering::Relaxed);
            loop {
                if current >= mine {
                    return Err("listeners.NAME.limits.max_connections");
                }
                match door.mine.compare_exchange_weak(
                    current,
                    current + 1,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(now) => current = now,
                }
            }
        } else {
            door.mine.fetch_add(1, Ordering::AcqRel);
        }
        let count = &door.all;
        let mut current = count.load(Ordering::Relaxed);
        loop {
            if current >= max {
                door.mine.fetch_sub(1, Ordering::AcqRel);
                return Err("limits.max_connections");
            }
            match count.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    door.open.inc();
                    return Ok(ConnectionSlot(door.clone()));
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

    fn entry(&self) -> Arc<Entry> {
        self.0.entry()
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.all.fetch_sub(1, Ordering::AcqRel);
        self.0.mine.fetch_sub(1, Ordering::AcqRel);
        self.0.open.dec();
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

/// Accept loop shared by every listener. `proxy`: each connection starts with a PROXY
/// protocol header naming the client (`proxy_protocol = true`).
pub async fn run(
    listener: TcpListener,
    transport: Transport,
    door: Arc<Door>,
    proxy: bool,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    // One bucket per listener, holding one second's worth of connections; remade when a
    // reload changes the rate.
    let bucket =
        |rate: u32| crate::connection::TokenBucket::per_second(rate, std::time::Instant::now());
    let mut connect_rate = door.entry().limits.max_connect_rate;
    let mut rate = bucket(connect_rate);
    let name = door.name;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE/ENFILE and friends: the condition passes as connections close.
                tracing::warn!(listener = name, error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let entry = door.entry();
        let max = broker.limits().max_connections;
        if entry.limits.max_connect_rate != connect_rate {
            connect_rate = entry.limits.max_connect_rate;
            rate = bucket(connect_rate);
        }
        if let Some(bucket) = rate.as_mut() {
            if !bucket.try_take(1.0, std::time::Instant::now()) {
                broker.metrics.refused_connect_rate.inc();
                broker.metrics.listener_refused(name, "connect_rate");
                tracing::info!(%peer, listener = name, rate = connect_rate, "connection refused: limits.max_connect_rate exceeded");
                drop(stream);
                continue;
            }
        }
        let slot = match Door::try_take(&door, max) {
            Ok(slot) => slot,
            Err(bound) => {
                broker.metrics.refused_max_connections.inc();
                broker.metrics.listener_refused(name, "max_connections");
                tracing::info!(%peer, listener = name, max, "connection refused: {bound} reached");
                drop(stream);
                continue;
            }
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
        let timeout = entry.limits.connect_timeout;
        // One spawn per transport, so that each task's future is only as large as its own
        // transport's (a plain TCP connection does not carry room for TLS and WebSocket state:
        // with 10,000 connections that is tens of MiB).
        match transport.clone() {
            Transport::Tcp if !proxy => {
                // `serve` itself is the task (no wrapping block that would keep a second copy
                // of its arguments in every connection's task); it holds the slot.
                tokio::spawn(crate::connection::serve(stream, peer, broker, None, slot));
            }
            Transport::Tcp => {
                tokio::spawn(async move {
                    let Some((stream, peer)) =
                        front(stream, peer, proxy, name, &broker, timeout).await
                    else {
                        return;
                    };
                    crate::connection::serve(stream, peer, broker, None, slot).await
                });
            }
            Transport::Tls(tls) => {
                tokio::spawn(async move {
                    let Some((stream, peer)) =
                        front(stream, peer, proxy, name, &broker, timeout).await
                    else {
                        return;
                    };
                    if let Some((s, identity)) =
                        tls_handshake(stream, peer, name, &broker, &tls, timeout).await
                    {
                        crate::connection::serve(s, peer, broker, identity, slot).await
                    }
                });
            }
            Transport::Ws(ws) => {
                tokio::spawn(async move {
                    let Some((stream, peer)) =
                        front(stream, peer, proxy, name, &broker, timeout).await
                    else {
                        return;
                    };
                    if let Some(s) = ws_handshake(stream, peer, &broker, &ws, timeout).await {
                        crate::connection::serve(s, peer, broker, None, slot).await
                    }
                });
            }
            Transport::Wss(tls, ws) => {
                tokio::spawn(async move {
                    let Some((stream, peer)) =
                        front(stream, peer, proxy, name, &broker, timeout).await
                    else {
                        return;
                    };
                    let Some((s, identity)) =
                        tls_handshake(stream, peer, name, &broker, &tls, timeout).await
                    else {
                        return;
                    };
                    if let Some(s) = ws_handshake(s, peer, &broker, &ws, timeout).await {
                        crate::connection::serve(s, peer, broker, identity, slot).await
                    }
                });
            }
        }
    }
}

/// The socket and the client's address: with `proxy`, after the PROXY protocol header
/// ([`proxied`]); `None` when the connection is to be closed.
async fn front(
    mut stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    proxy: bool,
    listener: &'static str,
    broker: &Broker,
    timeout: Duration,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    if !proxy {
        return Some((stream, peer));
    }
    let peer = proxied(&mut stream, peer, listener, broker, timeout).await?;
    Some((stream, peer))
}

/// The client's address from the PROXY protocol header a load balancer put in front of the
/// connection (the socket's own when the header says LOCAL: a health check). A connection
/// without a valid header is closed, with one log line: on such a listener every
/// connection comes through the proxy, so one that does not is an error or an attempt to
/// go around it.
async fn proxied(
    stream: &mut tokio::net::TcpStream,
    socket_peer: std::net::SocketAddr,
    listener: &'static str,
    broker: &Broker,
    timeout: Duration,
) -> Option<std::net::SocketAddr> {
    match crate::proxy::read_header(stream, timeout).await {
        Ok(Some(addr)) => Some(addr),
        Ok(None) => Some(socket_peer),
        Err(e) => {
            broker.metrics.refused_protocol.inc();
            broker.metrics.listener_refused(listener, "proxy_header");
            tracing::info!(peer = %socket_peer, listener, error = %e, "connection refused: no valid PROXY protocol header");
            None
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
    timeout: Duration,
) -> Option<WsStream<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
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
    listener: &'static str,
    broker: &Broker,
    tls: &crate::tls::TlsReloader,
    timeout: Duration,
) -> Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    Option<String>,
)> {
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
                tracing::info!(%peer, listener, "connection refused: no client certificate Common Name to use as username");
                broker.metrics.refused_auth.inc();
                broker.metrics.listener_refused(listener, "auth");
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
