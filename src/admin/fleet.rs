//! The admin API in a cluster: a listing covers every node and an action reaches the node
//! that holds the client, whichever node's API was called.
//!
//! The node serving the call asks every node at once over the cluster's admin subject
//! (`cluster/admin.rs`, core NATS request with many answers) and merges: pages of sessions or
//! clients (each node's page is in client id order after the same cursor, so the merged page
//! is the first `limit` of their union, cut at the smallest cursor a node gave back: below it
//! every node has said everything), and for an action or a lookup the answer of the node that
//! found the client. Every node answers, including the asking one, whether or not its own
//! API is on: the request came over NATS, which only the cluster's nodes reach. Without a
//! cluster everything is answered here.

use super::here::{self, Action, Listing};

use super::{Admin, ApiError, MAX_LIMIT};
use crate::broker::Broker;
use crate::cluster::AdminHandler;
use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// How long the asking node waits for the others' answers to a listing or lookup (a node
/// that died and still counts as a member until its heartbeat expires costs this much).
const ASK_WAIT: Duration = Duration::from_secs(2);
/// The same for an action: longer than an action takes on the node that does it (a
/// session's deletion waits up to 5 s for its connection to let go).
const ACT_WAIT: Duration = Duration::from_secs(7);

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Page {
        what: Listing,
        after: Option<String>,
        limit: usize,
    },
    One {
        id: String,
        sessions: bool,
    },
    Act {
        action: Action,
        id: String,
    },
}

/// A lookup's or an action's answer over the wire.
fn reply(r: Result<Value, ApiError>) -> Value {
    match r {
        Ok(body) => json!({ "status": 200, "body": body }),
        Err(e) => json!({ "status": e.status().as_u16(), "error": e.to_string() }),
    }
}

fn unreply(v: &Value) -> Result<Value, ApiError> {
    let status = v.get("status").and_then(Value::as_u64).unwrap_or(500);
    if status == 200 {
        return Ok(v.get("body").cloned().unwrap_or(Value::Null));
    }
    let message = v
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("failed")
        .to_string();
    Err(ApiError::from_status(status as u16, message))
}

async fn answer(broker: &Arc<Broker>, request: &[u8]) -> Value {
    match serde_json::from_slice::<Request>(request) {
        Ok(Request::Page { what, after, limit }) => {
            let (items, next) =
                here::local_page(broker, what, after.as_deref(), limit.clamp(1, MAX_LIMIT));
            json!({ "items": items, "next": next })
        }
        Ok(Request::One { id, sessions }) => reply(here::local_one(broker, &id, sessions)),
        Ok(Request::Act { action, id }) => reply(here::local(broker, action, &id).await),
        Err(e) => reply(Err(ApiError::BadRequest(e.to_string()))),
    }
}

/// What this node answers other nodes' (and its own) admin requests with.
pub fn handler(broker: Arc<Broker>) -> AdminHandler {
    Arc::new(move |request: Bytes| {
        let broker = broker.clone();
        Box::pin(async move { Bytes::from(answer(&broker, &request).await.to_string()) })
    })
}

/// Every node's answer to `request`, parsed; None without a cluster.
async fn ask(admin: &Admin, request: &Request) -> Option<Vec<Value>> {
    let node = admin.fleet.as_ref()?;
    let bytes = Bytes::from(serde_json::to_vec(request).ok()?);
    let wait = match request {
        Request::Act { .. } => ACT_WAIT,
        _ => ASK_WAIT,
    };
    let (answers, all) = node.ask_every_node(bytes, wait).await;
    if !all {
        tracing::warn!(
            answered = answers.len(),
            "admin request: not every node of the cluster answered; the answer covers those that did"
        );
    }
    Some(
        answers
            .iter()
            .filter_map(|a| serde_json::from_slice::<Value>(a).ok())
            .collect(),
    )
}

fn client_id(v: &Value) -> &str {
    v.get("client_id").and_then(Value::as_str).unwrap_or("")
}

/// Merges nodes' pages (each: items in client id order after the same cursor, and the
/// node's own next cursor) into one page of at most `limit`.
fn merge(pages: Vec<(Vec<Value>, Option<String>)>, limit: usize) -> (Vec<Value>, Option<String>) {
    let mut items = Vec::new();
    let mut bound: Option<String> = None;
    for (page, next) in pages {
        items.extend(page);
        if let Some(n) = next {
            if bound.as_ref().is_none_or(|b| n < *b) {
                bound = Some(n);
            }
        }
    }
    items.sort_by(|a, b| client_id(a).cmp(client_id(b)));
    // A session moving between nodes may show on both for a moment: once.
    items.dedup_by(|a, b| client_id(a) == client_id(b));
    if let Some(b) = &bound {
        items.retain(|i| client_id(i) <= b.as_str());
    }
    // Cut by the limit: go on after the last one given. Else, where the earliest node
    // stopped looking (every kept item is at or below it), or the end.
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|i| client_id(i).to_string())
    } else {
        bound
    };
    (items, next)
}

/// A page of sessions or clients: this node's, or in a cluster every node's.
pub(super) async fn page(
    admin: &Admin,
    what: Listing,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<Value>, Option<String>), ApiError> {
    let request = Request::Page {
        what: what.clone(),
        after: after.map(str::to_string),
        limit,
    };
    let Some(answers) = ask(admin, &request).await else {
        return Ok(here::local_page(&admin.broker, what, after, limit));
    };
    if answers.is_empty() {
        return Err(ApiError::Failed("no node of the cluster answered".into()));
    }
    let pages = answers
        .into_iter()
        .map(|a| {
            let items = a
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let next = a.get("next").and_then(Value::as_str).map(str::to_string);
            (items, next)
        })
        .collect();
    Ok(merge(pages, limit))
}

/// The first success among the nodes' answers, else the first refusal that is not "not
/// found", else "not found".
fn pick(answers: Vec<Value>, not_found: ApiError) -> Result<Value, ApiError> {
    let mut refusal = None;
    for a in &answers {
        match unreply(a) {
            Ok(v) => return Ok(v),
            Err(ApiError::NotFound(_)) => {}
            Err(e) => refusal = refusal.or(Some(e)),
        }
    }
    Err(refusal.unwrap_or(not_found))
}

/// One client or session, wherever it is.
pub(super) async fn one(admin: &Admin, id: &str, sessions: bool) -> Result<Value, ApiError> {
    let request = Request::One {
        id: id.to_string(),
        sessions,
    };
    match ask(admin, &request).await {
        None => here::local_one(&admin.broker, id, sessions),
        Some(answers) => pick(
            answers,
            here::local_one(&admin.broker, id, sessions)
                .err()
                .unwrap_or_else(|| ApiError::NotFound(id.to_string())),
        ),
    }
}

/// `action` on `id`, done by the node that holds it.
pub(super) async fn act(admin: &Admin, action: Action, id: &str) -> Result<Value, ApiError> {
    let request = Request::Act {
        action,
        id: id.to_string(),
    };
    match ask(admin, &request).await {
        None => here::local(&admin.broker, action, id).await,
        Some(answers) => pick(
            answers,
            ApiError::NotFound(format!("no client or session {id:?} on any node")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(items: &[Value]) -> Vec<&str> {
        items.iter().map(client_id).collect()
    }

    fn page(ids: &[&str], next: Option<&str>) -> (Vec<Value>, Option<String>) {
        (
            ids.iter().map(|i| json!({ "client_id": i })).collect(),
            next.map(str::to_string),
        )
    }

    #[test]
    fn pages_merge_in_order_up_to_the_limit() {
        let (items, next) = merge(
            vec![page(&["a", "d"], None), page(&["b", "c", "e"], None)],
            3,
        );
        assert_eq!(
            (ids(&items), next.as_deref()),
            (vec!["a", "b", "c"], Some("c"))
        );
        let (items, next) = merge(vec![page(&["a"], None), page(&["b"], None)], 3);
        assert_eq!((ids(&items), next), (vec!["a", "b"], None));
    }

    #[test]
    fn a_node_that_stopped_early_bounds_the_page() {
        // The second node looked at its budget and stopped at "c": "d" from the first node
        // must wait, or the second node's entries between "c" and "d" would be skipped.
        let (items, next) = merge(vec![page(&["a", "d"], None), page(&["b"], Some("c"))], 10);
        assert_eq!((ids(&items), next.as_deref()), (vec!["a", "b"], Some("c")));
        let (items, next) = merge(vec![page(&[], Some("m")), page(&["x"], None)], 10);
        assert_eq!(
            (ids(&items), next.as_deref()),
            (Vec::<&str>::new(), Some("m"))
        );
    }

    #[test]
    fn a_session_on_two_nodes_shows_once() {
        let (items, _) = merge(vec![page(&["a", "b"], None), page(&["b"], None)], 10);
        assert_eq!(ids(&items), vec!["a", "b"]);
    }

    #[test]
    fn the_finder_answers_an_action() {
        let answers = vec![
            reply(Err(ApiError::NotFound("no".into()))),
            reply(Ok(json!({ "kicked": true }))),
        ];
        let v = pick(answers, ApiError::NotFound("x".into())).expect("found");
        assert_eq!(v["kicked"], true);
        let none = vec![reply(Err(ApiError::NotFound("no".into())))];
        assert!(matches!(
            pick(none, ApiError::NotFound("x".into())),
            Err(ApiError::NotFound(_))
        ));
        let failed = vec![reply(Err(ApiError::Failed("held".into())))];
        assert!(matches!(
            pick(failed, ApiError::NotFound("x".into())),
            Err(ApiError::Failed(_))
        ));
    }
}
