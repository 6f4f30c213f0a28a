//! The admin API's listings: clients, sessions, subscriptions, retained messages, groups.
//!
//! Sessions and clients come from the registry in client id order, a page at a time
//! ([`crate::session::registry::Registry::page`]); what a session holds (queue, in flight,
//! oldest age) is read from its handle after the registry lock is released, so a listing
//! never holds up a connecting client for longer than copying a page of handles.

use super::here::Listing;
use super::{page, Admin, ApiError, Paging};
use crate::session::registry::Presence;
use crate::storage::record::unix_now_ms;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde_json::{json, Value};

/// A retained message's payload shown in a listing, at most: the listing is for finding
/// things, not for bulk export.
const PAYLOAD_PREVIEW: usize = 1024;

/// `GET /clients`: connected clients.
pub(super) async fn clients(
    State(admin): State<Admin>,
    Query(p): Query<Paging>,
) -> Result<Response, ApiError> {
    let limit = p.limit()?;
    let (items, next) =
        super::fleet::page(&admin, Listing::Clients, p.after.as_deref(), limit).await?;
    Ok(page(items, next))
}

/// `GET /clients/{id}`.
pub(super) async fn client(
    State(admin): State<Admin>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let v = super::fleet::one(&admin, &id, false).await?;
    Ok(Json(v).into_response())
}

/// `?state=` of `GET /sessions`.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct SessionQuery {
    state: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /sessions?state=offline|online|all`.
pub(super) async fn sessions(
    State(admin): State<Admin>,
    Query(q): Query<SessionQuery>,
) -> Result<Response, ApiError> {
    let presence = match q.state.as_deref() {
        None | Some("all") => Presence::Any,
        Some("online") => Presence::Online,
        Some("offline") => Presence::Offline,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "state must be online, offline or all, not {other:?}"
            )))
        }
    };
    let limit = q.paging().limit()?;
    let (items, next) = super::fleet::page(
        &admin,
        Listing::Sessions(presence),
        q.after.as_deref(),
        limit,
    )
    .await?;
    Ok(page(items, next))
}

/// `GET /sessions/{id}`: one session with its subscriptions.
pub(super) async fn session(
    State(admin): State<Admin>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let v = super::fleet::one(&admin, &id, true).await?;
    Ok(Json(v).into_response())
}

/// `?client=` or `?filter=` of `GET /subscriptions`.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct SubscriptionQuery {
    client: Option<String>,
    filter: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /subscriptions?client=ID`: that session's subscriptions. `?filter=F`: the sessions
/// subscribed with exactly `F` (a `$share/...` or `$queue/...` filter names the group's
/// members), paged by client id.
pub(super) async fn subscriptions(
    State(admin): State<Admin>,
    Query(q): Query<SubscriptionQuery>,
) -> Result<Response, ApiError> {
    let paging = q.paging();
    match (q.client, q.filter) {
        (Some(id), None) => {
            let v = super::fleet::one(&admin, &id, true).await?;
            let items = v
                .get("subscriptions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            Ok(page(items, None))
        }
        (None, Some(filter)) => {
            // Walks the sessions a page at a time, as `GET /sessions` does: a filter few
            // sessions use gives short pages with a cursor rather than one long scan.
            let limit = paging.limit()?;
            let (items, next) = super::fleet::page(
                &admin,
                Listing::Subscribers(filter),
                paging.after.as_deref(),
                limit,
            )
            .await?;
            Ok(page(items, next))
        }
        _ => Err(ApiError::BadRequest(
            "give exactly one of client=ID and filter=FILTER".into(),
        )),
    }
}

/// `?filter=` of `GET /retained`.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct RetainedQuery {
    filter: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// `GET /retained?filter=F` (default `#`): retained messages in topic order, with the first
/// [`PAYLOAD_PREVIEW`] bytes of each payload (base64).
pub(super) async fn retained(
    State(admin): State<Admin>,
    Query(q): Query<RetainedQuery>,
) -> Result<Response, ApiError> {
    let filter = q.filter.as_deref().unwrap_or("#");
    if !crate::protocol::validate::is_valid_topic_filter(filter) {
        return Err(ApiError::BadRequest(format!(
            "{filter:?} is not a valid topic filter"
        )));
    }
    let limit = q.paging().limit()?;
    let (shown, more) = admin
        .broker
        .retained_page(filter, q.after.as_deref(), limit);
    let now = crate::clock::now();
    let items = shown
        .iter()
        .map(|m| {
            let shown = &m.payload[..m.payload.len().min(PAYLOAD_PREVIEW)];
            json!({
                "topic": m.topic.as_str(),
                "qos": m.qos as u8,
                "size": m.payload.len(),
                "payload_base64": base64::engine::general_purpose::STANDARD.encode(shown),
                "truncated": shown.len() < m.payload.len(),
                "expires_in_seconds": m.expires_at.map(|t| t.saturating_duration_since(now).as_secs()),
            })
        })
        .collect();
    let next = more
        .then(|| shown.last().map(|m| m.topic.to_string()))
        .flatten();
    Ok(page(items, next))
}

/// `GET /groups`: shared subscription groups, declared queues and bridges' queues, with
/// their members and depth.
pub(super) async fn groups(State(admin): State<Admin>) -> Result<Response, ApiError> {
    let now = unix_now_ms() / 1000;
    let mut items: Vec<(String, Value)> = admin
        .broker
        .groups
        .all()
        .iter()
        .map(|g| {
            let (queued, _) = g.queue.outbox.counts();
            let kind = match g.kind {
                crate::broker::shared::Kind::Shared => "shared",
                crate::broker::shared::Kind::Queue => "queue",
                crate::broker::shared::Kind::Bridge => "bridge",
            };
            let members: Vec<Value> = g
                .member_view()
                .into_iter()
                .map(|(id, online, outstanding)| {
                    json!({ "client_id": &*id, "online": online, "outstanding": outstanding })
                })
                .collect();
            let key = g.key();
            let v = json!({
                "key": key,
                "kind": kind,
                "name": &*g.share,
                "filters": g.filters().iter().map(|f| f.to_string()).collect::<Vec<_>>(),
                "queued": queued,
                "oldest_age_seconds": admin.broker.queue_oldest_age(&g.queue, now),
                "members": members,
            });
            (key, v)
        })
        .collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(page(items.into_iter().map(|(_, v)| v).collect(), None))
}

/// `?after=&limit=` of a query that has more fields (serde's `flatten` would lose the
/// numbers' types in a query string, so each query lists them itself).
macro_rules! paged {
    ($($t:ty),*) => {$(
        impl $t {
            fn paging(&self) -> Paging {
                Paging {
                    after: self.after.clone(),
                    limit: self.limit,
                }
            }
        }
    )*};
}
paged!(SessionQuery, SubscriptionQuery, RetainedQuery);
