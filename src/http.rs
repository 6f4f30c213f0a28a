//! The HTTP side on the metrics port: `/metrics` (Prometheus text), `/health`, `/ready` and
//! the status page (`/`, `/status.json`). It sits above the broker and reads it; nothing below
//! imports it. The counters it exposes live in `metrics.rs`, below the broker, so the core
//! bumps them without knowing who serves them.

use crate::broker::Broker;
use crate::metrics::{BrokerState, GroupState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What a scrape reports of the broker, read now (one pass over the registry; the registry
/// lock is held only to copy handles).
pub fn state_of(broker: &Broker) -> BrokerState {
    BrokerState {
        sessions: broker.registry.stats(),
        subscriptions: broker.subscription_count(),
        retained: broker.retained_count(),
        groups: broker
            .groups
            .all()
            .iter()
            .map(|g| {
                let (queued, reservations_open) = g.queue.outbox.counts();
                GroupState {
                    share: g.share.to_string(),
                    filter: g.filter.to_string(),
                    members: g.member_count(),
                    queued,
                    reservations_open,
                }
            })
            .collect(),
    }
}

/// Serves `/metrics`, `/health` and `/ready` until the task is dropped. Deliberately tiny:
/// one request per connection, bounded header size and time, so a scraper cannot hold
/// resources. `ready` is set once the store is recovered and every listener is open, and
/// cleared when shutdown begins, so a load balancer stops sending clients first.
pub async fn serve(listener: TcpListener, broker: Arc<Broker>, ready: Arc<AtomicBool>) {
    let status = Arc::new(crate::status::Status::default());
    loop {
        let (mut sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let broker = broker.clone();
        let status = status.clone();
        let ready = ready.load(Ordering::Acquire);
        tokio::spawn(async move {
            let mut req = Vec::with_capacity(1024);
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => req.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = req.split(|&b| b == b'\r').next().unwrap_or(&[]);
            let path = line.split(|&b| b == b' ').nth(1).unwrap_or(b"/");
            let (status, ctype, body) = match path {
                b"/metrics" => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    broker.metrics.render(&state_of(&broker)),
                ),
                b"/" => (
                    "200 OK",
                    "text/html; charset=utf-8",
                    crate::status::PAGE.as_bytes().to_vec(),
                ),
                b"/status.json" => (
                    "200 OK",
                    "application/json",
                    status.json(&broker).into_bytes(),
                ),
                b"/health" => ("200 OK", "text/plain", b"ok\n".to_vec()),
                b"/ready" if ready => ("200 OK", "text/plain", b"ready\n".to_vec()),
                b"/ready" => (
                    "503 Service Unavailable",
                    "text/plain",
                    b"not ready\n".to_vec(),
                ),
                _ => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(&body).await;
            let _ = sock.shutdown().await;
        });
    }
}
