//! The HTTP side on the metrics port: `/metrics` (Prometheus text), `/health`, `/ready` and
//! the status page (`/`, `/status.json`). It sits above the broker and reads it; nothing below
//! imports it. The counters it exposes live in `metrics.rs`, below the broker, so the core
//! bumps them without knowing who serves them.
//!
//! Routing is an axum [`Router`] ([`router`]); connections are served by hyper's HTTP/1
//! connection builder, whose options carry the limits: see [`serve`].

use crate::admin::{Admin, Lifetime};
use crate::broker::shared::Kind;
use crate::broker::Broker;
use crate::metrics::{BrokerState, GroupState};
use crate::status::Status;
use crate::tls::TlsReloader;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Extension;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Time a client has from connecting to the end of its request headers (slowloris).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Request line and headers, at most; a longer head is answered 431.
const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Connections served at once. Past it, new connections wait in the listen backlog until one
/// ends; each lives at most [`CONNECTION_LIFETIME`], so the wait is bounded too.
const MAX_CONNECTIONS: usize = 64;
/// Longest a connection may live, from accept to the last byte of its response: a client that
/// does not read its answer cannot hold a connection slot. A trace's stream pushes its
/// connection's deadline to the trace's end ([`Lifetime`]); a trace lasts an hour at most.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// After the stop signal, how long requests already being answered get to finish.
const DRAIN: Duration = Duration::from_secs(1);

/// What a scrape reports of the broker, read now (one pass over the registry; the registry
/// lock is held only to copy handles).
pub fn state_of(broker: &Broker) -> BrokerState {
    BrokerState {
        jwks_failures: broker.auth.jwks_failures(),
        sessions: broker.registry.stats(),
        subscriptions: broker.subscription_count(),
        retained: broker.retained_count(),
        groups: broker
            .groups
            .all()
            .iter()
            .map(|g| {
                let (queued, reservations_open) = g.queue.outbox.counts();
                let age = broker.oldest_age(g);
                GroupState {
                    share: g.share.to_string(),
                    filter: g.filter().to_string(),
                    members: g.member_count(),
                    queued,
                    reservations_open,
                    oldest_age: (g.kind != Kind::Shared).then_some(age),
                    bridge: g.kind == Kind::Bridge,
                    age,
                }
            })
            .collect(),
    }
}

/// What every handler reads.
#[derive(Clone)]
struct App {
    broker: Arc<Broker>,
    status: Arc<Status>,
    ready: Arc<AtomicBool>,
}

/// The routes of the metrics port. Each answers `GET` (and `HEAD`, without the body); another
/// method on a known path is answered 405 with `Allow`, an unknown path 404. `ready` is set
/// once the store is recovered and every listener is open, and cleared when shutdown begins,
/// so a load balancer stops sending clients first. With `admin`, the admin API's routes
/// (`/api/v1/...`, `admin/mod.rs`) are served beside them.
pub fn router(broker: Arc<Broker>, ready: Arc<AtomicBool>, admin: Option<Admin>) -> Router {
    let base = Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(page))
        .route("/status.json", get(status_json))
        .route("/health", get(health))
        .route("/ready", get(readiness))
        .fallback(not_found)
        .with_state(App {
            broker,
            status: Arc::new(Status::default()),
            ready,
        });
    match admin {
        Some(admin) => base.merge(crate::admin::router(admin)),
        None => base,
    }
}

async fn metrics(State(app): State<App>) -> Response {
    let body = app.broker.metrics.render(&state_of(&app.broker));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        crate::status::PAGE,
    )
        .into_response()
}

async fn status_json(State(app): State<App>) -> Response {
    let body = app.status.json(&app.broker);
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn health() -> Response {
    text(StatusCode::OK, "ok\n")
}

async fn readiness(State(app): State<App>) -> Response {
    if app.ready.load(Ordering::Acquire) {
        text(StatusCode::OK, "ready\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "not found\n")
}

fn text(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

/// Serves [`router`] on `listener` until `stop` completes, then stops accepting and gives the
/// requests being answered up to [`DRAIN`] to finish; what is left then is aborted.
///
/// One request per connection (no keep-alive: a scraper or a viewer holds nothing between
/// requests), [`MAX_HEADER_BYTES`] of request head sent within [`HEADER_TIMEOUT`], at most
/// [`MAX_CONNECTIONS`] at once, each for at most [`CONNECTION_LIFETIME`].
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    ready: Arc<AtomicBool>,
    admin: Option<Admin>,
    tls: Option<Arc<TlsReloader>>,
    stop: impl Future<Output = ()>,
) {
    let routes = router(broker, ready, admin);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .keep_alive(false);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    // The connections' tasks: whatever is left after the drain is aborted with the set.
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => break,
            accepted = async {
                // The semaphore is never closed, so acquiring only waits.
                let slot = slots.clone().acquire_owned().await.ok();
                (slot, listener.accept().await)
            } => accepted,
        };
        let (sock, slot) = match accepted {
            (slot, Ok((sock, _))) => (sock, slot),
            (_, Err(e)) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Reap the finished ones (at most MAX_CONNECTIONS are running).
        while connections.try_join_next().is_some() {}
        let watcher = graceful.watcher();
        // This connection's deadline, which a streamed answer (a trace) may push later.
        let lifetime = Lifetime::until(tokio::time::Instant::now() + CONNECTION_LIFETIME);
        let service = TowerToHyperService::new(routes.clone().layer(Extension(lifetime.clone())));
        let builder = builder.clone();
        // The acceptor in force now (a reload may replace it for later connections).
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        connections.spawn(async move {
            let conn = async move {
                match acceptor {
                    None => watcher
                        .watch(builder.serve_connection(TokioIo::new(sock), service))
                        .await
                        .map_err(|e| e.to_string()),
                    Some(acceptor) => {
                        // The handshake has the header time: a client that does not finish
                        // it holds no slot longer than one that does not send its head.
                        let stream = tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(sock))
                            .await
                            .map_err(|_| "TLS handshake timed out".to_string())?
                            .map_err(|e| format!("TLS handshake: {e}"))?;
                        watcher
                            .watch(builder.serve_connection(TokioIo::new(stream), service))
                            .await
                            .map_err(|e| e.to_string())
                    }
                }
            };
            tokio::pin!(conn);
            let ended = loop {
                tokio::select! {
                    r = &mut conn => break Some(r),
                    () = tokio::time::sleep_until(lifetime.deadline()) => {
                        if lifetime.deadline() <= tokio::time::Instant::now() {
                            break None;
                        }
                    }
                }
            };
            match ended {
                Some(Ok(())) => {}
                Some(Err(e)) => tracing::debug!(error = %e, "metrics connection ended"),
                None => tracing::debug!("metrics connection outlived its time; closed"),
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("metrics requests still running at shutdown; dropped");
    }
    connections.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;

    fn broker() -> Arc<Broker> {
        let config = Config::default();
        let auth = crate::auth::Authorizer::load(&config.mqtt.response_prefix, &config.auth)
            .expect("no auth files");
        Arc::new(Broker::new(
            config,
            crate::metrics::Metrics::new().expect("metrics"),
            Arc::new(crate::storage::MemoryStore),
            auth,
        ))
    }

    struct Server {
        addr: SocketAddr,
        ready: Arc<AtomicBool>,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn server() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let ready = Arc::new(AtomicBool::new(true));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            broker(),
            ready.clone(),
            None,
            None,
            async move {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            ready,
            stop,
            task,
        }
    }

    /// Sends `request` as is and reads until the server closes: (status, headers, body).
    async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("send");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        let text = String::from_utf8(buf).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        (status, head.to_ascii_lowercase(), body.to_string())
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        exchange(addr, req.as_bytes()).await
    }

    #[tokio::test]
    async fn routes_answer_as_documented() {
        let s = server().await;
        let (status, head, body) = get(s.addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert!(body.contains("tern_connections_open "), "{body}");
        // One request per connection, and the client is told so.
        assert!(head.contains("connection: close"), "{head}");

        let (status, head, body) = get(s.addr, "/").await;
        assert_eq!(status, 200);
        assert!(
            head.contains("content-type: text/html; charset=utf-8"),
            "{head}"
        );
        assert_eq!(body, crate::status::PAGE);

        let (status, head, body) = get(s.addr, "/status.json").await;
        assert_eq!(status, 200);
        assert!(
            head.contains("content-type: application/json\r\n"),
            "{head}"
        );
        assert!(body.starts_with('{'), "{body}");

        for (path, want) in [("/health", "ok\n"), ("/ready", "ready\n")] {
            let (status, head, body) = get(s.addr, path).await;
            assert_eq!((status, body.as_str()), (200, want), "{path}");
            assert!(head.contains("content-type: text/plain\r\n"), "{head}");
        }
        s.ready.store(false, Ordering::Release);
        let (status, _, body) = get(s.addr, "/ready").await;
        assert_eq!((status, body.as_str()), (503, "not ready\n"));

        for path in ["/nothing", "/metrics/extra", "/metrics/"] {
            let (status, _, body) = get(s.addr, path).await;
            assert_eq!((status, body.as_str()), (404, "not found\n"), "{path}");
        }
        // The query string is not part of the path.
        assert_eq!(get(s.addr, "/health?probe=1").await.0, 200);
    }

    #[tokio::test]
    async fn other_methods_are_405_and_head_has_no_body() {
        let s = server().await;
        let (status, head, _) = exchange(
            s.addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(status, 405);
        assert!(head.contains("allow: get,head"), "{head}");
        let (status, head, body) =
            exchange(s.addr, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!((status, body.as_str()), (200, ""));
        assert!(head.contains("content-length: 3"), "{head}");
    }

    #[tokio::test]
    async fn oversized_head_is_431() {
        let s = server().await;
        let req = format!(
            "GET /health HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
            "a".repeat(MAX_HEADER_BYTES)
        );
        assert_eq!(exchange(s.addr, req.as_bytes()).await.0, 431);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_is_cut_off() {
        let s = server().await;
        let mut c = TcpStream::connect(s.addr).await.expect("connect");
        c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("send");
        let started = tokio::time::Instant::now();
        let mut buf = Vec::new();
        // Closed without an answer once the header time is over (the clock is paused, so
        // this waits no real time).
        let _ = c.read_to_end(&mut buf).await;
        assert!(
            started.elapsed() >= HEADER_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < CONNECTION_LIFETIME,
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn connections_past_the_cap_wait_for_a_slot() {
        let s = server().await;
        let mut slow = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut c = TcpStream::connect(s.addr).await.expect("connect");
            c.write_all(b"GET /health HTTP/1.1\r\n")
                .await
                .expect("send");
            slow.push(c);
        }
        let started = tokio::time::Instant::now();
        // Answered once the slow ones are cut off, not before (paused clock: no real wait).
        assert_eq!(get(s.addr, "/health").await.0, 200);
        assert!(
            started.elapsed() >= HEADER_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
    }

    /// A trace outlives the port's 30 s connection bound: its stream pushes the deadline to the
    /// trace's end, and the answer ends with the trace's last line. A request that is not a
    /// trace still gets 30 s.
    #[tokio::test(start_paused = true)]
    async fn a_trace_stream_outlives_the_connection_bound() {
        let dir = std::env::temp_dir().join(format!("tern-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("tokens");
        std::fs::write(&path, "t:0123456789abcdef0123\n").expect("tokens");
        let b = broker();
        let tokens = Arc::new(crate::admin::Tokens::load(&path).expect("tokens"));
        let admin = Admin::new(b.clone(), tokens, None);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(
            listener,
            b,
            Arc::new(AtomicBool::new(true)),
            Some(admin),
            None,
            async move {
                let _ = stopped.await;
            },
        ));
        let body = r#"{"topic": "a/b", "duration": "45s"}"#;
        let req = format!(
            "POST /api/v1/traces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer 0123456789abcdef0123\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let started = tokio::time::Instant::now();
        let (status, _, text) = exchange(addr, req.as_bytes()).await;
        assert_eq!(status, 200);
        assert!(
            started.elapsed() >= Duration::from_secs(45),
            "{:?}",
            started.elapsed()
        );
        assert!(text.contains("\"event\":\"ended\""), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn stop_closes_the_listener_and_returns() {
        let s = server().await;
        // A client still sending its head (accepted: the GET after it is answered) holds the
        // stop up for the drain bound at most, and its connection is closed then.
        let mut slow = TcpStream::connect(s.addr).await.expect("connect");
        slow.write_all(b"GET /health HTTP/1.1\r\n")
            .await
            .expect("send");
        assert_eq!(get(s.addr, "/health").await.0, 200);
        let _ = s.stop.send(());
        tokio::time::timeout(DRAIN * 2, s.task)
            .await
            .expect("serve returned within the drain bound")
            .expect("serve did not panic");
        assert!(TcpStream::connect(s.addr).await.is_err());
        let mut buf = Vec::new();
        // Closed (end of stream or reset) rather than left to its header timeout.
        let closed = tokio::time::timeout(DRAIN, slow.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "the slow connection outlived the server");
    }
}
