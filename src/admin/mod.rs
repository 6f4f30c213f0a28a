//! The admin API: HTTP + JSON under `/api/v1` on the metrics port, for an operator's three
//! questions (where did a message go, who is falling behind, how do I get rid of this
//! session) and their answers as actions. docs/operations.md, "Admin API", documents every
//! route with examples; `/api/v1/openapi.json` describes them, and a test checks the real
//! responses against it.
//!
//! - Off unless `[admin] token_file` is set; then every route but the description wants
//!   `Authorization: Bearer TOKEN` ([`tokens`]), answered 401 otherwise.
//! - Listings (`read.rs`) are paged by cursor: `?after=<last key of the previous page>` and
//!   `?limit=` (default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]); a page is consistent with
//!   itself, not with the whole set, and costs the same with a million sessions.
//! - Actions (`act.rs`, `users.rs`) write one audit log line each (target `tern::audit`:
//!   token name, action, subject, result), whatever the result.
//! - In a cluster, listings of clients, sessions and subscriptions cover every node, and
//!   kicks, deletions and purges of sessions reach the node that holds the client
//!   (`fleet.rs`).
//!
//! It sits above the broker and the bridges and below `http.rs`, which mounts [`router`].

mod act;
mod fleet;
mod here;
mod read;
pub mod tokens;
mod trace;
mod users;

use crate::broker::Broker;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
pub use fleet::handler as cluster_handler;
use std::sync::Arc;
pub use tokens::{TokenError, Tokens};

/// Items per page when `?limit=` is not given.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest `?limit=`: a page is built under the registry lock.
pub const MAX_LIMIT: usize = 1000;

/// What every handler reads.
#[derive(Clone)]
pub struct Admin {
    pub broker: Arc<Broker>,
    pub tokens: Arc<Tokens>,
    /// The cluster, when this node is in one: listings and actions reach every node.
    fleet: Option<Arc<crate::cluster::Node>>,
    /// Held while the password or ACL file is rewritten, so two calls do not interleave
    /// their read-modify-write.
    files: Arc<tokio::sync::Mutex<()>>,
}

impl Admin {
    pub fn new(
        broker: Arc<Broker>,
        tokens: Arc<Tokens>,
        fleet: Option<Arc<crate::cluster::Node>>,
    ) -> Admin {
        Admin {
            broker,
            tokens,
            fleet,
            files: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

/// How long the metrics port lets a connection live, which a streamed answer (a trace, which
/// may last an hour) pushes later. `http.rs` puts one on every request and closes the
/// connection once the latest deadline set here has passed.
#[derive(Clone)]
pub struct Lifetime(Arc<std::sync::Mutex<tokio::time::Instant>>);

impl Lifetime {
    pub fn until(deadline: tokio::time::Instant) -> Lifetime {
        Lifetime(Arc::new(std::sync::Mutex::new(deadline)))
    }

    /// The deadline in force.
    pub fn deadline(&self) -> tokio::time::Instant {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves the deadline to `at` if that is later.
    pub fn extend_to(&self, at: tokio::time::Instant) {
        let mut d = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if at > *d {
            *d = at;
        }
    }
}

/// The token's name, put on the request by [`authenticate`] for the audit line.
#[derive(Clone)]
pub struct Caller(pub String);

/// Why a call failed; the body is `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a valid `Authorization: Bearer TOKEN` header is required")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The call cannot be done in this configuration (e.g. no password file to add a user
    /// to); nothing was changed.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooMany(String),
    #[error("{0}")]
    Failed(String),
}

impl ApiError {
    /// The error a node's answer over the cluster stands for.
    fn from_status(status: u16, message: String) -> ApiError {
        match status {
            400 => ApiError::BadRequest(message),
            401 => ApiError::Unauthorized,
            404 => ApiError::NotFound(message),
            409 => ApiError::Conflict(message),
            429 => ApiError::TooMany(message),
            _ => ApiError::Failed(message),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut r = (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"tern\""),
            );
        }
        r
    }
}

/// An action's answer, and its audit line (one per action, whatever its result: who, by the
/// token's name; what; on what; and how it went).
fn audited(
    caller: &Caller,
    action: &str,
    subject: &str,
    result: Result<serde_json::Value, ApiError>,
) -> Response {
    match result {
        Ok(outcome) => {
            tracing::info!(
                target: "tern::audit",
                token = %caller.0,
                action,
                subject,
                result = %outcome,
                "admin action"
            );
            Json(outcome).into_response()
        }
        Err(e) => {
            tracing::warn!(
                target: "tern::audit",
                token = %caller.0,
                action,
                subject,
                result = "refused",
                error = %e,
                "admin action"
            );
            e.into_response()
        }
    }
}

/// Lets the request through when it carries a token in force.
async fn authenticate(
    State(admin): State<Admin>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        })
        .ok_or(ApiError::Unauthorized)?;
    let name = admin
        .tokens
        .check(presented.as_bytes())
        .ok_or(ApiError::Unauthorized)?;
    req.extensions_mut().insert(Caller(name));
    Ok(next.run(req).await)
}

/// The API's description (OpenAPI 3.0); `tests/python/test_admin.py` checks real responses
/// against it.
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The routes under `/api/v1`. Unknown paths fall through to the metrics port's 404.
pub fn router(admin: Admin) -> Router {
    let api = Router::new()
        .route("/clients", get(read::clients))
        .route("/clients/{id}", get(read::client).delete(act::kick))
        .route("/sessions", get(read::sessions))
        .route(
            "/sessions/{id}",
            get(read::session).delete(act::delete_session),
        )
        .route("/sessions/{id}/purge", post(act::purge_session))
        .route("/subscriptions", get(read::subscriptions))
        .route(
            "/retained",
            get(read::retained).delete(act::delete_retained),
        )
        .route("/groups", get(read::groups))
        .route("/groups/purge", post(act::purge_group))
        .route("/users", get(users::list))
        .route("/users/{name}", put(users::set).delete(users::remove))
        .route(
            "/acl",
            get(users::acl)
                .post(users::acl_add)
                .delete(users::acl_remove),
        )
        // Traces (trace.rs) are mounted here.
        .route("/traces", post(trace::start))
        .route_layer(middleware::from_fn_with_state(admin.clone(), authenticate))
        .route("/openapi.json", get(openapi))
        .with_state(admin);
    Router::new().nest("/api/v1", api)
}

/// `?after=&limit=` of a listing.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Paging {
    pub after: Option<String>,
    pub limit: Option<usize>,
}

impl Paging {
    fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::BadRequest(format!(
                "limit must be between 1 and {MAX_LIMIT}"
            ))),
        }
    }
}

/// A page of a listing: `{"items": [...], "next": "cursor" | null}`.
fn page(items: Vec<serde_json::Value>, next: Option<String>) -> Response {
    Json(serde_json::json!({ "items": items, "next": next })).into_response()
}
