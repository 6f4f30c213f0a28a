//! `POST /api/v1/traces`: a message trace (`broker/trace.rs`) streamed to the caller as JSON
//! lines (`application/x-ndjson`), one per step of every message the trace selects, until its
//! duration ends (then the response ends) or the caller goes away (then the trace is released
//! at once, by the stream's drop: a disconnected reader must not hold one of the few traces).
//!
//! Body: exactly one of `{"client_id": ..}`, `{"topic": ..}`, `{"filter": ..}`, and an optional
//! `"duration"` (`"60s"`, `"500ms"`, `"5m"`, `"1h"`, or a number of seconds; default
//! [`DEFAULT_DURATION`]). The first line says what was started (`"event": "started"`), the
//! last why it ended (`"event": "ended"`); docs/operations.md, "Message trace", lists the rest.

use super::{Admin, ApiError};
use crate::broker::trace::{Event, Selector, TraceError, MAX_DURATION};
use crate::broker::Broker;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A trace's length when the body does not say.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(60);
/// Events written in one chunk at most (the reader catches up in few writes).
const CHUNK_EVENTS: usize = 256;
/// Past a trace's end, how long its connection may still live to send the last lines.
const STREAM_GRACE: Duration = Duration::from_secs(5);

/// The request body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TraceRequest {
    client_id: Option<String>,
    topic: Option<String>,
    filter: Option<String>,
    duration: Option<DurationField>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum DurationField {
    Seconds(u64),
    Text(String),
}

/// Why a trace request is refused with 400.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum BadRequest {
    #[error("the body is not a JSON object of client_id|topic|filter and duration: {0}")]
    Json(String),
    #[error("give exactly one of client_id, topic, filter")]
    Selector,
    #[error("duration {0:?}: a number with ms, s, m or h (e.g. \"60s\")")]
    Duration(String),
}

/// `"60s"`, `"500ms"`, `"5m"`, `"1h"`, `"1.5s"` or `"60"` (seconds).
fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number.parse().ok()?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(n * scale).ok()
}

fn parse(body: &[u8]) -> Result<(Selector, Duration), BadRequest> {
    let b: TraceRequest =
        serde_json::from_slice(body).map_err(|e| BadRequest::Json(e.to_string()))?;
    let selector = match (b.client_id, b.topic, b.filter) {
        (Some(c), None, None) => Selector::ClientId(c),
        (None, Some(t), None) => Selector::Topic(t),
        (None, None, Some(f)) => Selector::Filter(f),
        _ => return Err(BadRequest::Selector),
    };
    let duration = match b.duration {
        None => DEFAULT_DURATION,
        Some(DurationField::Seconds(s)) => Duration::from_secs(s),
        Some(DurationField::Text(t)) => parse_duration(&t).ok_or(BadRequest::Duration(t))?,
    };
    Ok((selector, duration))
}

fn selector_json(s: &Selector) -> serde_json::Value {
    match s {
        Selector::ClientId(c) => serde_json::json!({ "client_id": c }),
        Selector::Topic(t) => serde_json::json!({ "topic": t }),
        Selector::Filter(f) => serde_json::json!({ "filter": f }),
    }
}

/// The first line: what was started.
#[derive(serde::Serialize)]
struct StartedLine {
    event: &'static str,
    ts: u64,
    trace: u64,
    selector: serde_json::Value,
    duration_ms: u64,
    max_duration_ms: u64,
}

/// The last line: why the trace ended.
#[derive(serde::Serialize)]
struct EndedLine<'a> {
    event: &'static str,
    ts: u64,
    t_us: u64,
    reason: &'a str,
}

fn line(value: &impl serde::Serialize) -> Vec<u8> {
    // Plain fields into a Vec: cannot fail; an empty object would say so if it did.
    let mut v = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    v
}

/// Releases the trace when the response ends or is dropped (the caller went away).
struct Release {
    broker: Arc<Broker>,
    id: u64,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.broker.tracer.stop(self.id);
    }
}

/// The response body's state between chunks.
struct Streaming {
    release: Release,
    events: mpsc::Receiver<Event>,
    ends: tokio::time::Instant,
    started: std::time::Instant,
    head: Option<Vec<u8>>,
    done: bool,
}

impl Streaming {
    /// `ev` and whatever else is buffered (up to a chunk) as JSON lines.
    fn chunk(&mut self, first: Event) -> Vec<u8> {
        let mut out = first.to_json();
        out.push(b'\n');
        for _ in 1..CHUNK_EVENTS {
            let Ok(ev) = self.events.try_recv() else {
                break;
            };
            out.extend_from_slice(&ev.to_json());
            out.push(b'\n');
        }
        out
    }

    /// The last chunk: what was still buffered, then the `ended` line.
    fn last(&mut self, reason: &str) -> Vec<u8> {
        self.release.broker.tracer.stop(self.release.id);
        let mut out = Vec::new();
        while let Ok(ev) = self.events.try_recv() {
            out.extend_from_slice(&ev.to_json());
            out.push(b'\n');
        }
        self.done = true;
        let since = crate::clock::now().saturating_duration_since(self.started);
        out.extend_from_slice(&line(&EndedLine {
            event: "ended",
            ts: crate::storage::record::unix_now_ms(),
            t_us: u64::try_from(since.as_micros()).unwrap_or(u64::MAX),
            reason,
        }));
        out
    }

    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Streaming)> {
        if let Some(head) = self.head.take() {
            return Some((Ok(Bytes::from(head)), self));
        }
        if self.done {
            return None;
        }
        let out = tokio::select! {
            ev = self.events.recv() => match ev {
                Some(ev) => self.chunk(ev),
                // The broker dropped the trace (it is shutting down).
                None => self.last("stopped"),
            },
            _ = tokio::time::sleep_until(self.ends) => self.last("duration"),
        };
        Some((Ok(Bytes::from(out)), self))
    }
}

/// `POST /api/v1/traces`.
pub async fn start(
    State(admin): State<Admin>,
    lifetime: Option<Extension<super::Lifetime>>,
    body: Bytes,
) -> Response {
    let (selector, duration) = match parse(&body) {
        Ok(x) => x,
        Err(e) => return ApiError::BadRequest(e.to_string()).into_response(),
    };
    let shown = selector_json(&selector);
    let started = match admin.broker.tracer.start(selector, duration) {
        Ok(s) => s,
        Err(e @ TraceError::Busy) => return ApiError::TooMany(e.to_string()).into_response(),
        Err(e) => return ApiError::BadRequest(e.to_string()).into_response(),
    };
    let head = line(&StartedLine {
        event: "started",
        ts: crate::storage::record::unix_now_ms(),
        trace: started.id,
        selector: shown,
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        max_duration_ms: MAX_DURATION.as_secs() * 1000,
    });
    let state = Streaming {
        release: Release {
            broker: admin.broker.clone(),
            id: started.id,
        },
        events: started.events,
        ends: tokio::time::Instant::from_std(started.ends),
        started: started.started,
        head: Some(head),
        done: false,
    };
    // The connection lives as long as the trace (and a moment for its last line), not the
    // metrics port's usual 30 s.
    if let Some(Extension(l)) = lifetime {
        l.extend_to(state.ends + STREAM_GRACE);
    }
    let stream = futures_util::stream::unfold(state, Streaming::next);
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("7d"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("-1s"), None);
    }

    #[test]
    fn a_body_names_one_selector() {
        let (s, d) = parse(br#"{"topic": "a/b", "duration": "2s"}"#).expect("valid");
        assert_eq!(s, Selector::Topic("a/b".into()));
        assert_eq!(d, Duration::from_secs(2));
        let (s, d) = parse(br#"{"client_id": "c1"}"#).expect("valid");
        assert_eq!(s, Selector::ClientId("c1".into()));
        assert_eq!(d, DEFAULT_DURATION);
        assert_eq!(
            parse(br#"{"topic": "a", "filter": "a/#"}"#),
            Err(BadRequest::Selector)
        );
        assert_eq!(parse(br#"{"duration": 5}"#), Err(BadRequest::Selector));
        assert!(matches!(
            parse(b"{\"topc\": \"a\"}"),
            Err(BadRequest::Json(_))
        ));
        assert!(matches!(parse(b"not json"), Err(BadRequest::Json(_))));
        assert_eq!(
            parse(br#"{"filter": "a/#", "duration": "soon"}"#),
            Err(BadRequest::Duration("soon".into()))
        );
    }
}
